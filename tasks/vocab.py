"""Vocabularies: the ``spiece.model`` beside a checkpoint, or one trained on BigBench text.

The trained vocabulary is for the demo and the tests (a model trained from scratch):
a SentencePiece unigram model over the training-split prompts and answers of the
paper's tasks, with T5's special ids (pad 0, eos 1, unk 2, no bos), byte fallback (any
text round-trips) and "\\n" kept as its own piece (FLAN-T5's vocabulary cannot write a
newline; this one can). Training is deterministic (one thread, no sampling) and takes a
few seconds; the model is cached under ``cache_dir()`` keyed by a hash of the text and
the options, so later calls only read the file.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence

import gin
import sentencepiece as spm
import seqio
from etils import epath

from hir_jax.special_ids import EOS_ID, PAD_ID, UNK_ID
from tasks import bigbench
from tasks.cache import CACHE_ENV_VAR, cache_dir  # noqa: F401  (re-exported)

DEFAULT_VOCAB_SIZE = 2048
T5_EXTRA_IDS = 100
SPIECE_NAMES = ("spiece.model", "sentencepiece.model")

# Bump when the training options below change, so stale cached models are not reused.
_TRAINER_VERSION = "1"
_TRAINER_OPTIONS = dict(
    model_type="unigram",
    pad_id=PAD_ID,
    eos_id=EOS_ID,
    unk_id=UNK_ID,
    bos_id=-1,
    character_coverage=1.0,
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    user_defined_symbols=["\n"],
    num_threads=1,
    input_sentence_size=0,
    shuffle_input_sentence=False,
    max_sentence_length=1 << 20,
    minloglevel=2,
)


def _has_extra_ids(model_proto: bytes) -> bool:
    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    return sp.piece_to_id("<extra_id_0>") != sp.unk_id()


def find_spiece_model(path: str | os.PathLike[str]) -> epath.Path:
    """The SentencePiece file itself, or ``spiece.model`` / ``sentencepiece.model`` in the
    folder ``path`` (an HF checkpoint folder)."""
    p = epath.Path(path)
    if p.is_dir():
        for name in SPIECE_NAMES:
            if (p / name).exists():
                return p / name
        raise FileNotFoundError(
            f"{p}: no {' or '.join(SPIECE_NAMES)} in this folder; pass the vocabulary file "
            "itself (T5X: gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model)."
        )
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such SentencePiece model")
    return p


def checkpoint_vocabulary(
    path: str | os.PathLike[str], extra_ids: int | None = None
) -> seqio.SentencePieceVocabulary:
    """SeqIO vocabulary from a checkpoint's ``spiece.model`` (file or its folder).

    ``extra_ids=None`` follows T5: 100 sentinel ids are added unless the model already
    holds ``<extra_id_0>`` (HF ``spiece.model`` has 32000 pieces -> 32100 ids; T5X's
    ``cc_all.32000.100extra`` model already has them).
    """
    model = find_spiece_model(path)
    if extra_ids is None:
        extra_ids = 0 if _has_extra_ids(model.read_bytes()) else T5_EXTRA_IDS
    return seqio.SentencePieceVocabulary(str(model), extra_ids=extra_ids)


def _cache_key(texts: Sequence[str], vocab_size: int) -> str:
    h = hashlib.sha256()
    h.update(f"v{_TRAINER_VERSION}|{spm.__version__}|{vocab_size}|".encode())
    h.update(repr(sorted(_TRAINER_OPTIONS.items())).encode())
    for text in texts:
        h.update(text.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def train_sentencepiece(
    texts: Sequence[str],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    cache: str | os.PathLike[str] | None = None,
    name: str = "spm",
) -> epath.Path:
    """Train (or reuse from the cache) a SentencePiece model on ``texts``; returns its path.

    Deterministic: the same texts and size give the same file.
    """
    if not texts:
        raise ValueError("no texts to train a SentencePiece model on")
    folder = cache_dir(cache) / "spm"
    path = folder / f"{name}_{vocab_size}_{_cache_key(texts, vocab_size)}.model"
    if path.exists():
        return path
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=buf,
            vocab_size=vocab_size,
            **_TRAINER_OPTIONS,
        )
    except RuntimeError as err:
        raise ValueError(
            f"SentencePiece training with vocab_size={vocab_size} failed: {err} "
            "(the size must exceed 259 byte/special pieces plus the distinct characters)"
        ) from err
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)
    return path


def bigbench_vocabulary(
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    tasks: Sequence[str] | None = None,
    cache: str | os.PathLike[str] | None = None,
    bigbench_dir: str | os.PathLike[str] | None = None,
) -> seqio.SentencePieceVocabulary:
    """The project-trained vocabulary over the train-split prompts and answers of
    ``tasks`` (default: the paper's 12), cached on disk."""
    texts = bigbench.texts_for_vocabulary(tasks, bigbench_dir=bigbench_dir)
    path = train_sentencepiece(texts, vocab_size, cache=cache, name="bigbench")
    return seqio.SentencePieceVocabulary(str(path), extra_ids=0)


@gin.configurable(module="hir_tasks")
def get_vocabulary(
    spiece_model: str | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    tasks: Sequence[str] | None = None,
    cache: str | None = None,
) -> seqio.SentencePieceVocabulary:
    """The vocabulary selected by gin: ``spiece_model`` (a checkpoint folder or the model
    file) when set, else the trained BigBench vocabulary of ``vocab_size``."""
    if spiece_model:
        return checkpoint_vocabulary(spiece_model)
    return bigbench_vocabulary(vocab_size, tasks=tasks, cache=cache)

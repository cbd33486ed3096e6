"""The batch contract: feature names, the features a loss needs, padding and buckets.

A train batch is a dict of host arrays with a leading example dimension ``B``:

* ``encoder_pos_tokens`` ``[B, Le]``: query under the positive (hindsight) instruction;
* ``encoder_neg_tokens`` ``[B, Le]``: the same query under the negative instruction
  (only for a loss with a contrastive term);
* ``encoder_orig_tokens`` ``[B, Le]``: the same query under the sampling instruction
  (only for a loss with the released code's KL term to the reference);
* ``decoder_input_tokens`` ``[B, Ld]``: targets shifted right, starting with PAD (0);
* ``decoder_target_tokens`` ``[B, Ld]`` and ``decoder_loss_weights`` ``[B, Ld]`` (0 on pads);
* ``positive_is_correct`` ``[B]`` (only for the in-batch contrastive term);
* per-token rollout values ``[B, Ld]`` aligned with the decoder targets, for the RL
  methods: ``old_logprobs``, ``ref_logprobs``, ``old_values``, ``advantages``,
  ``returns`` (``add_token_features``).

``make_features`` builds them from relabeled examples; ``batch`` keeps what a loss needs,
cuts the lengths to buckets and pads the rows to a fixed batch, so that a round compiles
a handful of shapes at most. The loop, the train step, the AOT check and the benchmarks
all take the names and rules from here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from hir_jax.special_ids import DECODER_START_ID, EOS_ID
from tasks.instructions import CORRECT, prompt

if TYPE_CHECKING:
    from hir_jax.relabel import RelabeledExample

ENCODER_POS = "encoder_pos_tokens"
ENCODER_NEG = "encoder_neg_tokens"
ENCODER_ORIG = "encoder_orig_tokens"
DECODER_INPUT = "decoder_input_tokens"
DECODER_TARGET = "decoder_target_tokens"
DECODER_WEIGHTS = "decoder_loss_weights"
POS_IS_CORRECT = "positive_is_correct"
OLD_LOGPROBS = "old_logprobs"
REF_LOGPROBS = "ref_logprobs"
OLD_VALUES = "old_values"
ADVANTAGES = "advantages"
RETURNS = "returns"
TOKEN_FEATURES = (OLD_LOGPROBS, REF_LOGPROBS, OLD_VALUES, ADVANTAGES, RETURNS)
ENCODER_FEATURES = (ENCODER_POS, ENCODER_NEG, ENCODER_ORIG)
DECODER_FEATURES = (DECODER_INPUT, DECODER_TARGET, DECODER_WEIGHTS) + TOKEN_FEATURES
DTYPES: dict[str, Any] = {
    ENCODER_POS: np.int32,
    ENCODER_NEG: np.int32,
    ENCODER_ORIG: np.int32,
    DECODER_INPUT: np.int32,
    DECODER_TARGET: np.int32,
    DECODER_WEIGHTS: np.float32,
    POS_IS_CORRECT: np.int32,
    **{k: np.float32 for k in TOKEN_FEATURES},
}

# Sequence lengths are padded up to one of these (few compiled shapes).
DEFAULT_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048)
Overflow = Literal["error", "truncate"]


def required(loss: Any) -> list[str]:
    """The features the train step of ``loss`` (a ``train.LossConfig``) reads."""
    keys = [ENCODER_POS, DECODER_INPUT, DECODER_TARGET, DECODER_WEIGHTS]
    if loss.needs_negative:
        keys.append(ENCODER_NEG)
        if loss.contrastive == "in_batch":
            keys.append(POS_IS_CORRECT)
    if getattr(loss, "kl_coef", 0.0):
        keys.append(ENCODER_ORIG)
    return keys


def select(batch: Mapping[str, Any], loss: Any) -> dict[str, Any]:
    """The entries of ``batch`` that ``loss`` needs; KeyError naming what is missing."""
    keys = required(loss)
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"batch lacks {missing} (has {sorted(batch)}) for loss {loss}")
    return {k: batch[k] for k in keys}


def pick(batch: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The entries ``keys`` of ``batch``; KeyError naming what is missing."""
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"batch lacks {missing} (has {sorted(batch)})")
    return {k: batch[k] for k in keys}


# --------------------------------------------------------------------------- lengths, rows


def bucket_length(length: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """The smallest bucket that holds ``length`` tokens."""
    for b in sorted(buckets):
        if length <= b:
            return b
    raise ValueError(
        f"sequence of {length} tokens is longer than the largest bucket {max(buckets)}; "
        "raise the buckets or truncate the inputs"
    )


def padded_rows(rows: int, multiple: int) -> int:
    """``rows`` rounded up to a multiple (the data-parallel size: every device gets rows)."""
    return -(-rows // multiple) * multiple


def pad_rows(features: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Pads a partial batch with all-zero rows (zero loss weight: they add nothing)."""
    n = next(iter(features.values())).shape[0]
    if n == rows:
        return dict(features)
    return {
        k: np.concatenate([v, np.zeros((rows - n,) + v.shape[1:], v.dtype)])
        for k, v in features.items()
    }


def trim_to_buckets(
    features: Mapping[str, np.ndarray], buckets: Sequence[int] = DEFAULT_BUCKETS
) -> dict[str, np.ndarray]:
    """Cuts zero-padded encoder and decoder columns down to their length buckets."""
    out = dict(features)
    enc = [k for k in ENCODER_FEATURES if k in out]
    dec = [k for k in DECODER_FEATURES if k in out]
    for keys, ref in ((enc, enc), (dec, [DECODER_WEIGHTS])):
        if not keys:
            continue
        used = max(int(np.max(np.sum(out[k] != 0, axis=1), initial=0)) for k in ref)
        length = bucket_length(max(used, 1), buckets)
        for k in keys:
            out[k] = out[k][:, :length]
    return out


def pad_sequences(
    sequences: Sequence[Sequence[int]],
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    batch_multiple: int = 1,
) -> tuple[np.ndarray, int]:
    """Right-pads token lists to a bucketed length and the rows to a multiple.

    Returns the [rows, length] int32 array and the number of real rows; padding rows are
    all PAD and their outputs should be dropped.
    """
    if not sequences:
        raise ValueError("no sequences to pad")
    length = bucket_length(max(len(s) for s in sequences), buckets)
    out = np.zeros((padded_rows(len(sequences), batch_multiple), length), np.int32)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = s
    return out, len(sequences)


# --------------------------------------------------------------------------- building


def _pad(rows: list[np.ndarray], width: int, dtype: Any) -> np.ndarray:
    out = np.zeros((len(rows), width), dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def make_features(
    examples: Sequence[RelabeledExample],
    tokenize: Callable[[str], Sequence[int]],
    *,
    max_encoder_len: int,
    max_decoder_len: int,
    on_overflow: Overflow = "error",
    original: bool = False,
) -> dict[str, np.ndarray]:
    """Fixed-shape, zero-padded feature arrays for the train step.

    ``tokenize``: text -> ids without EOS (one trailing EOS, as HF tokenizers add, is
    removed). Keys (``B`` examples): every feature of the module doc, the encoder ones
    ``[B, max_encoder_len]`` = tokenize(prompt(instruction, query)) + prefix + [EOS], the
    decoder ones ``[B, max_decoder_len]``; and ``encoder_truncated``/``decoder_truncated``
    ``[B]``, tokens dropped per example.

    Too long: ``on_overflow="error"`` (default) raises ``ValueError`` naming the example
    and the lengths needed. ``"truncate"`` drops the oldest prefix tokens (the same
    number under both instructions, so the two inputs differ only by instruction) and
    the end of the target, and counts them; a prompt that does not fit even without
    prefix still raises.
    """
    if on_overflow not in ("error", "truncate"):
        raise ValueError(f"on_overflow must be 'error' or 'truncate', got {on_overflow!r}")
    cache: dict[str, list[int]] = {}

    def encode(text: str) -> list[int]:
        if text not in cache:
            ids = [int(t) for t in tokenize(text)]
            if ids and ids[-1] == EOS_ID:
                ids = ids[:-1]
            cache[text] = ids
        return cache[text]

    enc_pos, enc_neg, enc_orig, dec_tgt, enc_cut, dec_cut = [], [], [], [], [], []
    for i, ex in enumerate(examples):
        pos_ids = encode(prompt(ex.positive, ex.query))
        neg_ids = encode(prompt(ex.negative, ex.query))
        orig_ids = encode(prompt(CORRECT, ex.query)) if original else []
        prefix = [int(t) for t in ex.prefix]
        longest = max(len(pos_ids), len(neg_ids), len(orig_ids))
        need = longest + len(prefix) + 1
        cut = max(0, need - max_encoder_len)
        if cut and (on_overflow == "error" or cut > len(prefix)):
            raise ValueError(
                f"example {i}: encoder input needs {need} tokens (prompt "
                f"{longest} + moved prefix {len(prefix)} + EOS) but "
                f"max_encoder_len={max_encoder_len}; raise max_encoder_len"
                + (" or pass on_overflow='truncate'" if on_overflow == "error" else "")
            )
        prefix = prefix[cut:]
        enc_pos.append(np.asarray(pos_ids + prefix + [EOS_ID], np.int32))
        enc_neg.append(np.asarray(neg_ids + prefix + [EOS_ID], np.int32))
        if original:
            enc_orig.append(np.asarray(orig_ids + prefix + [EOS_ID], np.int32))
        enc_cut.append(cut)

        target = np.asarray(ex.target, np.int32)
        tcut = max(0, len(target) - max_decoder_len)
        if tcut and on_overflow == "error":
            raise ValueError(
                f"example {i}: decoder target has {len(target)} tokens but "
                f"max_decoder_len={max_decoder_len}; raise max_decoder_len or pass "
                "on_overflow='truncate'"
            )
        dec_tgt.append(target[: len(target) - tcut])
        dec_cut.append(tcut)

    targets = _pad(dec_tgt, max_decoder_len, np.int32)
    inputs = np.zeros_like(targets)
    inputs[:, 0] = DECODER_START_ID
    inputs[:, 1:] = targets[:, :-1]
    weights = _pad([np.ones(len(t), np.float32) for t in dec_tgt], max_decoder_len, np.float32)
    out = {
        ENCODER_POS: _pad(enc_pos, max_encoder_len, np.int32),
        ENCODER_NEG: _pad(enc_neg, max_encoder_len, np.int32),
        DECODER_TARGET: targets,
        DECODER_INPUT: inputs,
        DECODER_WEIGHTS: weights,
        POS_IS_CORRECT: np.asarray([ex.correct for ex in examples], np.int32),
        "encoder_truncated": np.asarray(enc_cut, np.int32),
        "decoder_truncated": np.asarray(dec_cut, np.int32),
    }
    if original:
        out[ENCODER_ORIG] = _pad(enc_orig, max_encoder_len, np.int32)
    return out


def batch(
    examples: Sequence[RelabeledExample],
    tokenize: Callable[[str], Sequence[int]],
    loss: Any,
    *,
    rows: int,
    max_encoder_len: int,
    max_decoder_len: int,
) -> dict[str, np.ndarray]:
    """One fixed-size train batch for ``loss``: its features only, lengths cut to buckets,
    zero rows up to ``rows``."""
    feats = make_features(
        examples, tokenize, max_encoder_len=max_encoder_len, max_decoder_len=max_decoder_len,
        original=ENCODER_ORIG in required(loss),
    )  # fmt: skip
    return pad_rows(trim_to_buckets(select(feats, loss)), rows)


def add_token_features(
    batch: Mapping[str, np.ndarray], per_example: Sequence[Mapping[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """``batch`` with per-token arrays of its first ``len(per_example)`` rows added, each
    zero-padded to the batch's decoder length and rows (``TOKEN_FEATURES`` names)."""
    out = dict(batch)
    rows, length = batch[DECODER_TARGET].shape
    if not per_example:
        return out
    for key in per_example[0]:
        arr = np.zeros((rows, length), np.float32)
        for i, values in enumerate(per_example):
            v = np.asarray(values[key], np.float32)[:length]
            arr[i, : len(v)] = v
        out[key] = arr
    return out


def abstract_batch(
    loss: Any,
    rows: int,
    encoder_length: int,
    decoder_length: int,
    sharding: Any = None,
    keys: Sequence[str] | None = None,
) -> dict[str, Any]:
    """``jax.ShapeDtypeStruct``s of one train batch for ``loss`` (ahead-of-time compiles);
    ``keys``: these features instead of what ``loss`` needs."""
    import jax

    def shape(key: str) -> tuple[int, ...]:
        if key == POS_IS_CORRECT:
            return (rows,)
        return (rows, encoder_length if key in ENCODER_FEATURES else decoder_length)

    names = required(loss) if keys is None else keys
    return {k: jax.ShapeDtypeStruct(shape(k), DTYPES[k], sharding=sharding) for k in names}


def real_examples(batch: Mapping[str, np.ndarray]) -> int:
    """Rows of a batch that carry loss weight (not padding)."""
    return int(np.sum(np.any(np.asarray(batch[DECODER_WEIGHTS]) > 0, axis=1)))

"""One entry point for any checkpoint: detect the format, load, validate; the vocabulary."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

from hir_jax.checkpoints import hf, t5x
from hir_jax.checkpoints.errors import NoCheckpointError, UnknownFormatError
from hir_jax.checkpoints.tree import Params, check_params, config_from_params, to_float32
from hir_jax.model.configs import T5Config
from hir_jax.paths import PathLike, as_path

if TYPE_CHECKING:
    import seqio

log = logging.getLogger(__name__)

Format = Literal["hf", "t5x"]
VOCABULARY_NAMES = ("spiece.model", "sentencepiece.model", "tokenizer.model")
NUM_EXTRA_IDS = 100  # T5's sentinel tokens <extra_id_0..99>


def detect_format(path: PathLike) -> Format:
    """The format at ``path``: "hf" (a directory with config.json) or "t5x".

    "t5x" covers the msgpack ``checkpoint`` file, a ``checkpoint_<step>`` directory (with
    that file, or T5X's Orbax ``state`` item) and a model directory holding such step
    directories.

    Raises NoCheckpointError for a missing path or a directory without a checkpoint, and
    UnknownFormatError for anything else.
    """
    p = as_path(path)
    if not p.exists():
        raise NoCheckpointError(f"{p}: no such file or directory")
    if not p.is_dir():
        if p.name == t5x.CHECKPOINT_FILE:
            t5x.find_checkpoint(p)  # rejects a TensorFlow checkpoint index
            return "t5x"
        if p.name in (hf.CONFIG_NAME, *hf.WEIGHT_NAMES):
            return "hf"
        raise UnknownFormatError(
            f"{p}: unknown checkpoint format; expected an HF directory (config.json + "
            "model.safetensors), a T5X checkpoint_<step> directory, or its 'checkpoint' file"
        )
    if (p / hf.CONFIG_NAME).exists():
        return "hf"
    if (p / t5x.CHECKPOINT_FILE).exists() or t5x.is_orbax_dir(p) or t5x.all_steps(p):
        t5x.find_checkpoint(p)  # refuses an Orbax directory that is not T5X's
        return "t5x"
    if list(p.glob("*.safetensors")) or list(p.glob("*.bin")):
        raise UnknownFormatError(f"{p}: has weight files but no {hf.CONFIG_NAME}")
    if list(p.glob("*.ckpt*.index")) or list(p.glob("model.ckpt-*")):
        raise UnknownFormatError(
            f"{p}: a TensorFlow (Mesh TF) checkpoint; convert it with T5X's checkpoint "
            "importer first"
        )
    ours = (
        "; a MODEL_DIR of ours (checkpoints/) is read by python -m hir_jax.convert"
        if (p / "checkpoints").is_dir()
        else ""
    )
    raise NoCheckpointError(
        f"{p}: no checkpoint found; looked for {hf.CONFIG_NAME} (HF), "
        f"{t5x.CHECKPOINT_FILE} or {t5x.ORBAX_STATE}/ (T5X step directory) and "
        f"checkpoint_<step>/ holding either (T5X model directory){ours}"
    )


def load_checkpoint(
    path: PathLike, config: T5Config | None = None, lazy: bool = False
) -> tuple[T5Config, Params]:
    """Load an HF or T5X checkpoint as ``(config, params)`` (fp32 numpy leaves).

    T5X: the legacy msgpack+zarr checkpoint or T5X's Orbax one (``checkpoint_<step>/state``,
    of which only ``target`` is read), a step directory or the model directory (its
    latest step), local or ``gs://``.

    HF: the config comes from config.json; a given ``config`` must agree with it on
    shapes and is returned. T5X: the params are checked against ``config`` if given,
    otherwise the shape fields are inferred (other fields keep ``T5Config`` defaults).
    ``lazy=True``: large leaves are fp32 ``LazyTensor``s, read a shard at a time when
    ``lazy.place`` (``create_train_state``) puts them on the mesh.
    """
    if detect_format(path) == "hf":
        return hf.load_hf(path, config, lazy=lazy)
    params, info = t5x.read_t5x(path, lazy=lazy)
    params = to_float32(params)
    return _t5x_config(params, config, str(info["file"])), params


def load_config(path: PathLike, config: T5Config | None = None) -> T5Config:
    """The config ``load_checkpoint`` would return, without reading the weights.

    HF: config.json. T5X: the shapes recorded in the checkpoint's metadata. Used when
    resuming, where the weights come from our own checkpoint instead.
    """
    if detect_format(path) == "hf":
        return hf.read_hf_config(path, config)
    shapes, info = t5x.read_t5x(path, lazy=True)
    return _t5x_config(shapes, config, str(info["file"]))


def _t5x_config(params: Params, config: T5Config | None, source: str) -> T5Config:
    """``config`` checked against T5X parameters (or their shapes), or inferred from them."""
    if config is None:
        config = config_from_params(params, source=source)
        log.info("%s: inferred %s", source, config)
    else:
        check_params(params, config, source)
    return config


def find_vocabulary(path: PathLike) -> PathLike:
    """The SentencePiece model file at ``path`` or beside the checkpoint ``path`` names.

    Looks in the directory (or the file's directory) and, for T5X step directories, in
    the model directory above it.
    """
    p = as_path(path)
    if p.exists() and not p.is_dir() and p.name != t5x.CHECKPOINT_FILE:
        return p
    directory = p if p.is_dir() else p.parent
    if directory.name == t5x.ORBAX_STATE and directory.parent.name.startswith("checkpoint_"):
        directory = directory.parent  # T5X's Orbax state item: look beside its step dir
    candidates = [directory / name for name in VOCABULARY_NAMES]
    if directory.name.startswith("checkpoint_"):
        candidates += [directory.parent / name for name in VOCABULARY_NAMES]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise NoCheckpointError(
        f"{p}: no SentencePiece vocabulary; looked for {', '.join(map(str, candidates))}"
    )


def load_vocabulary(path: PathLike, extra_ids: int | None = None) -> seqio.SentencePieceVocabulary:
    """``seqio.SentencePieceVocabulary`` for the SentencePiece model at or beside ``path``.

    ``extra_ids`` None picks T5's convention: 100 sentinel ids when the model lacks
    ``<extra_id_0>`` (HF's spiece.model), none when it has them (T5X's
    cc_all.32000.100extra), so both give the same 32100 ids.
    """
    import sentencepiece
    import seqio

    model_path = find_vocabulary(path)
    if extra_ids is None:
        processor = sentencepiece.SentencePieceProcessor()
        processor.LoadFromSerializedProto(as_path(model_path).read_bytes())
        has_sentinels = processor.piece_to_id("<extra_id_0>") != processor.unk_id()
        extra_ids = 0 if has_sentinels else NUM_EXTRA_IDS
    return seqio.SentencePieceVocabulary(str(model_path), extra_ids=extra_ids)

"""HF transformers T5 checkpoints <-> our parameter tree.

Reads ``config.json`` plus ``model.safetensors``, a sharded ``model.safetensors.index.json``,
or (when torch is installed) ``pytorch_model.bin`` / its index; tensors may be fp32, fp16
or bf16 and come back as fp32 numpy arrays. Writes ``config.json`` + safetensors that
``transformers.T5ForConditionalGeneration.from_pretrained`` loads with no missing or
unexpected keys.

Torch ``Linear`` weights are ``[out, in]``, our kernels ``[in, out]``; HF's relative
attention table is ``[buckets, heads]``, ours ``[heads, buckets]``: both are transposed.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from hir_jax.checkpoints import safetensors_io
from hir_jax.checkpoints.errors import (
    CheckpointError,
    ConfigError,
    MissingTensorError,
    NoCheckpointError,
    ShapeMismatchError,
    UnexpectedTensorError,
    UnknownFormatError,
)
from hir_jax.checkpoints.lazy import LazyTensor, from_array, materialize
from hir_jax.checkpoints.tree import Params, check_params, expected_shapes, flatten, unflatten
from hir_jax.model.configs import DECODER_START_ID, EOS_ID, PAD_ID, T5Config
from hir_jax.paths import PathLike, as_path, read_json, write_json

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
TORCH_NAME = "pytorch_model.bin"
TORCH_INDEX_NAME = "pytorch_model.bin.index.json"
WEIGHT_NAMES = (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, TORCH_NAME, TORCH_INDEX_NAME)
_UNSUPPORTED_WEIGHTS = ("flax_model.msgpack", "tf_model.h5", "model.ckpt.index")

SUPPORTED_MODEL_TYPES = ("t5", "mt5")
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9

# HF's T5Config / MT5Config defaults, used for keys a config.json leaves out.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "t5": dict(
        vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        dropout_rate=0.1, layer_norm_epsilon=1e-6, feed_forward_proj="relu",
        tie_word_embeddings=True,
    ),
    "mt5": dict(
        vocab_size=250112, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        dropout_rate=0.1, layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    ),
}  # fmt: skip

# dense_act_fn values HF may carry, per our feed_forward_proj.
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_ACT_FNS = {
    "gated-gelu": _TANH_GELU,
    "gated-relu": ("relu",),
    "relu": ("relu",),
    "gelu": ("gelu",),
}
_HF_ACT_FN = {"gated-gelu": "gelu_new", "gated-relu": "relu", "relu": "relu", "gelu": "gelu"}

# Tensors HF files may hold that our tree has no place for and HF itself ignores.
_IGNORABLE = (
    "encoder.embed_tokens.weight",
    "decoder.embed_tokens.weight",
    "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
)
_EMBEDDING_ALIASES = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


# --------------------------------------------------------------------------- config


def config_from_hf(hf_config: Mapping[str, Any], source: str = CONFIG_NAME) -> T5Config:
    """``T5Config`` from an HF ``config.json`` dict (``source`` is named in errors).

    Keys the dict leaves out take HF's defaults for its model type (so an old T5 v1.0
    config without ``feed_forward_proj`` / ``tie_word_embeddings`` means ReLU, tied).
    """
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = hf_config.get("architectures")
        raise ConfigError(
            f"{source}: model_type {model_type!r} (architectures {archs}) is not a T5 "
            f"encoder-decoder; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if hf_config.get("is_encoder_decoder") is False:
        raise ConfigError(f"{source}: is_encoder_decoder is false; an encoder-decoder is needed")
    cfg = {**_HF_DEFAULTS[model_type], **{k: v for k, v in hf_config.items() if v is not None}}
    ffp = cfg["feed_forward_proj"]
    if ffp not in _ACT_FNS:
        raise ConfigError(
            f"{source}: feed_forward_proj {ffp!r} is not supported; "
            f"supported: {', '.join(_ACT_FNS)}"
        )
    act_fn = hf_config.get("dense_act_fn")
    if act_fn is not None and act_fn not in _ACT_FNS[ffp]:
        raise ConfigError(
            f"{source}: dense_act_fn {act_fn!r} with feed_forward_proj {ffp!r} is not "
            f"supported (expected one of {_ACT_FNS[ffp]})"
        )
    gated = hf_config.get("is_gated_act")
    if gated is not None and bool(gated) != ffp.startswith("gated-"):
        raise ConfigError(f"{source}: is_gated_act={gated} contradicts feed_forward_proj {ffp!r}")
    num_layers = int(cfg["num_layers"])
    try:
        return T5Config(
            vocab_size=int(cfg["vocab_size"]),
            d_model=int(cfg["d_model"]),
            d_kv=int(cfg["d_kv"]),
            d_ff=int(cfg["d_ff"]),
            num_heads=int(cfg["num_heads"]),
            num_encoder_layers=num_layers,
            num_decoder_layers=int(cfg.get("num_decoder_layers", num_layers)),
            relative_attention_num_buckets=int(cfg["relative_attention_num_buckets"]),
            relative_attention_max_distance=int(cfg["relative_attention_max_distance"]),
            dropout_rate=float(cfg["dropout_rate"]),
            layer_norm_epsilon=float(cfg["layer_norm_epsilon"]),
            feed_forward_proj=ffp,
            tie_word_embeddings=bool(cfg["tie_word_embeddings"]),
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: cannot make a T5Config: {e}") from e


def config_to_hf(config: T5Config, dtype: str = "float32") -> dict[str, Any]:
    """The HF ``config.json`` dict for ``config`` (tensors stored as ``dtype``)."""
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": config.vocab_size,
        "d_model": config.d_model,
        "d_kv": config.d_kv,
        "d_ff": config.d_ff,
        "num_heads": config.num_heads,
        "num_layers": config.num_encoder_layers,
        "num_decoder_layers": config.num_decoder_layers,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "dropout_rate": config.dropout_rate,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_factor": 1.0,
        "feed_forward_proj": config.feed_forward_proj,
        "dense_act_fn": _HF_ACT_FN[config.feed_forward_proj],
        "is_gated_act": config.is_gated,
        "tie_word_embeddings": config.tie_word_embeddings,
        "is_encoder_decoder": True,
        "use_cache": True,
        "pad_token_id": PAD_ID,
        "eos_token_id": EOS_ID,
        "decoder_start_token_id": DECODER_START_ID,
        "torch_dtype": dtype,
    }


# --------------------------------------------------------------------------- names


def hf_name_map(config: T5Config) -> dict[str, tuple[str, bool]]:
    """Our flat name -> (HF tensor name, whether the HF tensor is the transpose)."""
    names: dict[str, tuple[str, bool]] = {"token_embedder/embedding": ("shared.weight", False)}
    attn = (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o"))
    for stack, num_layers in (
        ("encoder", config.num_encoder_layers),
        ("decoder", config.num_decoder_layers),
    ):
        names[f"{stack}/relpos_bias/rel_embedding"] = (
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            True,
        )
        if stack == "encoder":
            blocks = [("pre_attention_layer_norm", "attention", "SelfAttention")]
        else:
            blocks = [
                ("pre_self_attention_layer_norm", "self_attention", "SelfAttention"),
                ("pre_cross_attention_layer_norm", "encoder_decoder_attention", "EncDecAttention"),
            ]
        for i in range(num_layers):
            ours, theirs = f"{stack}/layers_{i}", f"{stack}.block.{i}.layer"
            for j, (norm, module, hf_module) in enumerate(blocks):
                names[f"{ours}/{norm}/scale"] = (f"{theirs}.{j}.layer_norm.weight", False)
                for proj, hf_proj in attn:
                    names[f"{ours}/{module}/{proj}/kernel"] = (
                        f"{theirs}.{j}.{hf_module}.{hf_proj}.weight",
                        True,
                    )
            j = len(blocks)
            names[f"{ours}/pre_mlp_layer_norm/scale"] = (f"{theirs}.{j}.layer_norm.weight", False)
            for wi in ("wi_0", "wi_1") if config.is_gated else ("wi",):
                names[f"{ours}/mlp/{wi}/kernel"] = (
                    f"{theirs}.{j}.DenseReluDense.{wi}.weight",
                    True,
                )
            names[f"{ours}/mlp/wo/kernel"] = (f"{theirs}.{j}.DenseReluDense.wo.weight", True)
        names[f"{stack}/{stack}_norm/scale"] = (f"{stack}.final_layer_norm.weight", False)
    if not config.tie_word_embeddings:
        names["decoder/logits_dense/kernel"] = ("lm_head.weight", True)
    return names


# --------------------------------------------------------------------------- reading


class _Weights:
    """The tensors of an HF checkpoint directory: names, shapes, files; read on demand."""

    def __init__(self, directory: PathLike) -> None:
        self.dir = as_path(directory)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.files: dict[str, Any] = {}
        self._torch: dict[str, np.ndarray] = {}
        if (self.dir / SAFETENSORS_NAME).exists():
            self._add_safetensors(self.dir / SAFETENSORS_NAME)
        elif (self.dir / SAFETENSORS_INDEX_NAME).exists():
            for shard in self._index_shards(self.dir / SAFETENSORS_INDEX_NAME):
                self._add_safetensors(shard)
        elif (self.dir / TORCH_NAME).exists():
            self._add_torch(self.dir / TORCH_NAME)
        elif (self.dir / TORCH_INDEX_NAME).exists():
            for shard in self._index_shards(self.dir / TORCH_INDEX_NAME):
                self._add_torch(shard)
        else:
            found = [n for n in _UNSUPPORTED_WEIGHTS if (self.dir / n).exists()]
            if found:
                raise UnknownFormatError(
                    f"{self.dir}: holds {', '.join(found)}, a weight format not read here; "
                    f"convert it to safetensors (looked for {', '.join(WEIGHT_NAMES)})"
                )
            raise NoCheckpointError(
                f"{self.dir}: has {CONFIG_NAME} but no weights; looked for "
                f"{', '.join(WEIGHT_NAMES)}"
            )
        files = {str(f) for f in self.files.values()}
        self.source = files.pop() if len(files) == 1 else str(self.dir)

    def _index_shards(self, index_path: Any) -> list[Any]:
        index = read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise UnknownFormatError(f"{index_path}: no 'weight_map' in the index")
        shards = []
        for name in dict.fromkeys(weight_map.values()):
            shard = self.dir / name
            if not shard.exists():
                tensor = next(k for k, v in weight_map.items() if v == name)
                raise MissingTensorError(
                    f"{index_path}: shard {name} (holding tensor {tensor!r} and others) "
                    f"does not exist in {self.dir}"
                )
            shards.append(shard)
        return shards

    def _add_safetensors(self, path: Any) -> None:
        header, _ = safetensors_io.read_header(path)
        for name, info in header.items():
            self.shapes[name] = tuple(info["shape"])
            self.files[name] = path

    def _add_torch(self, path: Any) -> None:
        try:
            import torch
        except ImportError as e:  # torch is a test-only dependency
            raise UnknownFormatError(
                f"{path}: reading pytorch_model.bin needs torch; install it or convert "
                "the checkpoint to safetensors"
            ) from e
        state = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
        for name, tensor in state.items():
            arr = tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy()
            self._torch[name] = arr
            self.shapes[name] = tuple(arr.shape)
            self.files[name] = path

    def lazy(self, names: list[str]) -> dict[str, LazyTensor]:
        """``names`` as ``LazyTensor``s (in their stored dtype)."""
        out = {n: from_array(self._torch[n], str(self.files[n])) for n in names if n in self._torch}
        by_file: dict[Any, list[str]] = {}
        for name in names:
            if name not in out:
                by_file.setdefault(self.files[name], []).append(name)
        for path, file_names in by_file.items():
            out.update(safetensors_io.lazy_tensors(path, file_names))
        return out


def _as_dir(path: PathLike) -> Any:
    path = as_path(path)
    if path.name in (CONFIG_NAME, *WEIGHT_NAMES) and not path.is_dir():
        return path.parent
    return path


def read_hf_config(path: PathLike, config: T5Config | None = None) -> T5Config:
    """The ``T5Config`` of an HF checkpoint directory (its config.json only).

    ``config``, when given, must agree with ``config.json`` on every shape-defining
    field; it is returned (so dtype, dropout etc. are the caller's).
    """
    directory = _as_dir(path)
    config_path = directory / CONFIG_NAME
    if not directory.exists():
        raise NoCheckpointError(f"{directory}: no such directory")
    if not config_path.exists():
        raise NoCheckpointError(f"{directory}: no {CONFIG_NAME} (not an HF checkpoint directory)")
    file_config = config_from_hf(read_json(config_path), str(config_path))
    if config is None:
        return file_config
    _check_same_shapes(config, file_config, str(config_path))
    return config


def load_hf(
    path: PathLike, config: T5Config | None = None, lazy: bool = False
) -> tuple[T5Config, Params]:
    """Load an HF T5 checkpoint directory as ``(config, params)`` with fp32 numpy leaves.

    The config is ``read_hf_config(path, config)``. ``lazy=True``: the leaves are fp32
    ``LazyTensor``s (names and shapes checked, nothing read yet; see ``lazy.place``).
    """
    directory = _as_dir(path)
    config_path = directory / CONFIG_NAME
    config = read_hf_config(path, config)
    weights = _Weights(directory)
    names = hf_name_map(config)
    shapes = expected_shapes(config)

    embed_name = next((n for n in _EMBEDDING_ALIASES if n in weights.shapes), "shared.weight")
    names["token_embedder/embedding"] = (embed_name, False)
    for ours, (theirs, transpose) in names.items():
        if theirs not in weights.shapes:
            raise MissingTensorError(
                f"{weights.source}: missing tensor {theirs!r} (for {ours}; "
                f"{_brief(config, str(config_path))})"
            )
        want = shapes[ours][::-1] if transpose else shapes[ours]
        if weights.shapes[theirs] != want:
            raise ShapeMismatchError(
                f"{weights.files[theirs]}: tensor {theirs!r} has shape {weights.shapes[theirs]}, "
                f"but {_brief(config, str(config_path))} needs {want}"
            )
    used = {theirs for theirs, _ in names.values()}
    ignorable = set(_IGNORABLE) | ({"lm_head.weight"} if config.tie_word_embeddings else set())
    extra = sorted(set(weights.shapes) - used - ignorable)
    if extra:
        raise UnexpectedTensorError(
            f"{weights.files[extra[0]]}: tensor {extra[0]!r} has no place in the model "
            f"({_brief(config, str(config_path))}); unexpected: {extra[:5]}"
            f"{' ...' if len(extra) > 5 else ''}"
        )

    stored = weights.lazy(sorted(used))
    flat = {}
    for ours, (theirs, transpose) in names.items():
        tensor = stored[theirs].astype(np.float32)
        flat[ours] = tensor.T if transpose else tensor
    params = unflatten(flat)
    check_params(params, config, str(directory))
    return config, params if lazy else materialize(params)


def _brief(config: T5Config, source: str) -> str:
    return f"the config in {source}: " + ", ".join(
        f"{k}={v}" for k, v in config.shape_dict().items()
    )


def _check_same_shapes(given: T5Config, found: T5Config, source: str) -> None:
    a, b = given.shape_dict(), found.shape_dict()
    diff = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
    if diff:
        detail = ", ".join(f"{k}: given {x!r}, file {y!r}" for k, (x, y) in diff.items())
        raise ShapeMismatchError(f"{source}: disagrees with the given config ({detail})")
    for key in ("relative_attention_max_distance", "layer_norm_epsilon"):
        if getattr(given, key) != getattr(found, key):
            log.warning(
                "%s: %s is %r, but the given config says %r; using the given config",
                source, key, getattr(found, key), getattr(given, key),
            )  # fmt: skip


# --------------------------------------------------------------------------- writing

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB", "200MB", "10KiB"."""
    if isinstance(size, int):
        return size
    match = _SIZE_RE.match(size)
    if not match:
        raise ValueError(f"cannot parse size {size!r}")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])


_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}


def save_hf(
    path: PathLike,
    config: T5Config,
    params: Mapping[str, Any],
    *,
    dtype: str = "float32",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    vocabulary: PathLike | None = None,
) -> None:
    """Write ``params`` as an HF T5 checkpoint directory ``transformers`` loads unchanged.

    Writes ``config.json``, ``generation_config.json`` and ``model.safetensors`` (or
    ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` when the
    tensors exceed ``max_shard_size``), replacing weight files of those names already
    there. ``dtype`` is "float32", "bfloat16" or "float16". ``vocabulary``, if given,
    is copied to ``spiece.model``. ``LazyTensor`` leaves are read one shard at a time.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    check_params(params, config, "params to save")
    directory = as_path(path)
    directory.mkdir(parents=True, exist_ok=True)
    flat = flatten(params)
    out_dtype = np.dtype(_DTYPES[dtype])
    by_hf_name = {theirs: (ours, tr) for ours, (theirs, tr) in hf_name_map(config).items()}

    def tensor(theirs: str) -> np.ndarray:
        ours, transpose = by_hf_name[theirs]
        value = flat[ours].T if transpose else flat[ours]  # a LazyTensor stays lazy
        return np.ascontiguousarray(np.asarray(value, dtype=np.float32).astype(out_dtype))

    # Shards are planned from shapes, then read and written one at a time: with lazy
    # params, host memory holds at most one shard.
    limit = parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    size = 0
    for theirs in by_hf_name:
        nbytes = int(np.prod(np.shape(flat[by_hf_name[theirs][0]]))) * out_dtype.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(theirs)
        size += nbytes

    for old in directory.iterdir():
        if old.name in (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME) or _SHARD_RE.match(old.name):
            old.unlink()
    metadata = {"format": "pt"}
    if len(shards) == 1:
        tensors = {theirs: tensor(theirs) for theirs in shards[0]}
        safetensors_io.write_tensors(directory / SAFETENSORS_NAME, tensors, metadata)
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {theirs: tensor(theirs) for theirs in shard}
            total += safetensors_io.write_tensors(directory / name, tensors, metadata)
            weight_map.update(dict.fromkeys(shard, name))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_json(directory / SAFETENSORS_INDEX_NAME, index)
    write_json(directory / CONFIG_NAME, config_to_hf(config, dtype))
    write_json(
        directory / "generation_config.json",
        {
            "decoder_start_token_id": DECODER_START_ID,
            "eos_token_id": EOS_ID,
            "pad_token_id": PAD_ID,
        },
    )
    if vocabulary is not None:
        source = as_path(vocabulary)
        if not source.exists():
            raise CheckpointError(f"{source}: vocabulary file does not exist")
        source.copy(directory / "spiece.model", overwrite=True)

"""Checkpoint import/export: HF safetensors, T5X (msgpack+zarr; Orbax read) <-> params.

>>> config, params = load_checkpoint("/path/to/flan-t5-base")  # HF directory
>>> config, params = load_checkpoint("gs://bucket/flan_t5_base/checkpoint_1184000")  # T5X
>>> vocab = load_vocabulary("/path/to/flan-t5-base")  # its spiece.model
>>> save_hf("/tmp/export", config, params)  # loads in transformers
"""

from hir_jax.checkpoints.errors import (
    CheckpointError,
    ConfigError,
    MissingTensorError,
    NoCheckpointError,
    ShapeMismatchError,
    UnexpectedTensorError,
    UnknownFormatError,
)
from hir_jax.checkpoints.hf import (
    config_from_hf,
    config_to_hf,
    hf_name_map,
    load_hf,
    read_hf_config,
    save_hf,
)
from hir_jax.checkpoints.io import (
    detect_format,
    find_vocabulary,
    load_checkpoint,
    load_config,
    load_vocabulary,
)
from hir_jax.checkpoints.t5x import find_checkpoint, load_t5x, read_t5x, save_t5x
from hir_jax.checkpoints.tree import (
    check_params,
    config_from_params,
    expected_shapes,
    flatten,
    unflatten,
)

__all__ = [
    "CheckpointError",
    "ConfigError",
    "MissingTensorError",
    "NoCheckpointError",
    "ShapeMismatchError",
    "UnexpectedTensorError",
    "UnknownFormatError",
    "check_params",
    "config_from_hf",
    "config_from_params",
    "config_to_hf",
    "detect_format",
    "expected_shapes",
    "find_checkpoint",
    "find_vocabulary",
    "flatten",
    "hf_name_map",
    "load_checkpoint",
    "load_config",
    "load_hf",
    "load_t5x",
    "read_hf_config",
    "load_vocabulary",
    "read_t5x",
    "save_hf",
    "save_t5x",
    "unflatten",
]

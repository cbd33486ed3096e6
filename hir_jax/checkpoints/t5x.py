"""T5X checkpoints (``checkpoint_<step>/checkpoint`` msgpack + TensorStore zarr) <-> params.

Layout (T5X ``checkpoints.py``, format version 3): the msgpack file holds
``{"version": 3, "optimizer": {"target": <params>, "state": <optimizer state>}}``. A leaf
written out of line is replaced by a TensorStore spec dict such as
``{"driver": "zarr", "dtype": "bfloat16", "kvstore": {"driver": "file", "path":
"target.encoder.layers_0.attention.query.kernel"}, "metadata": {...}}`` whose path is
relative to the checkpoint directory (the "/"-joined name with "." instead of "/"); a
``gcs`` kvstore carries the dummy bucket ``t5x-dummy-bucket``. Leaves not written out of
line are numpy arrays in the msgpack itself. Version 2 stored bfloat16 as uint16.

T5X's later Orbax-based writer (legacy Orbax, still a msgpack ``checkpoint`` file) puts
the string ``"PLACEHOLDER://<name>"`` there instead, the array being ``<ckpt dir>/<name>``
(zarr), or key ``<name>`` of the OCDBT store when the directory has ``manifest.ocdbt``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np
import tensorstore as ts
from etils import epath
from flax import serialization

from hir_jax.checkpoints.errors import (
    CheckpointError,
    MissingTensorError,
    NoCheckpointError,
    ShapeMismatchError,
    UnknownFormatError,
)
from hir_jax.checkpoints.lazy import Index, LazyTensor
from hir_jax.checkpoints.tree import Params, check_params, flatten, to_float32, unflatten
from hir_jax.model.configs import T5Config
from hir_jax.paths import PathLike, as_path, is_gcs, kvstore_spec

CHECKPOINT_FILE = "checkpoint"
VERSION = 3
DUMMY_BUCKET = "t5x-dummy-bucket"
PLACEHOLDER_PREFIX = "PLACEHOLDER://"  # Orbax's marker for an array stored out of line
_STEP_DIR_RE = re.compile(r"^checkpoint_(\d+)$")
_CHUNK_BYTES = 64 * 1024 * 1024
_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


# --------------------------------------------------------------------------- finding


def all_steps(model_dir: PathLike) -> list[int]:
    """Steps of the complete ``checkpoint_<step>/checkpoint`` files in ``model_dir``, sorted."""
    model_dir = as_path(model_dir)
    steps = []
    for ckpt in model_dir.glob(f"checkpoint_*/{CHECKPOINT_FILE}"):
        match = _STEP_DIR_RE.match(ckpt.parent.name)
        if match:
            steps.append(int(match.group(1)))
    return sorted(steps)


def is_tf_checkpoint_index(path: PathLike) -> bool:
    """True if ``path`` is TensorFlow's text ``checkpoint`` index (Mesh TF T5), not msgpack."""
    with as_path(path).open("rb") as f:
        return f.read(32).startswith(b"model_checkpoint_path")


def find_checkpoint(path: PathLike) -> epath.Path:
    """The msgpack ``checkpoint`` file for a file, a ``checkpoint_<step>`` dir or a model dir.

    A model dir resolves to its highest step.
    """
    path = as_path(path)
    if not path.exists():
        raise NoCheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / CHECKPOINT_FILE).exists() and not (path / CHECKPOINT_FILE).is_dir():
            path = path / CHECKPOINT_FILE
        else:
            steps = all_steps(path)
            if not steps:
                raise NoCheckpointError(
                    f"{path}: no T5X checkpoint; looked for {path / CHECKPOINT_FILE} and "
                    f"{path}/checkpoint_<step>/{CHECKPOINT_FILE}"
                )
            path = path / f"checkpoint_{steps[-1]}" / CHECKPOINT_FILE
    if path.name != CHECKPOINT_FILE and (path / "_CHECKPOINT_METADATA").exists():
        raise UnknownFormatError(
            f"{path}: an Orbax checkpoint (no msgpack '{CHECKPOINT_FILE}' file), not a T5X one"
        )
    if is_tf_checkpoint_index(path):
        raise UnknownFormatError(
            f"{path}: a TensorFlow (Mesh TF) checkpoint index, not a T5X msgpack checkpoint; "
            "convert it with T5X's checkpoint importer first"
        )
    return path


# --------------------------------------------------------------------------- reading


def _is_ts_spec(node: Any) -> bool:
    return (
        isinstance(node, Mapping)
        and isinstance(node.get("driver"), str)
        and ("kvstore" in node or "path" in node)
    )


def _flatten_target(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping) and not _is_ts_spec(value):
            flat.update(_flatten_target(value, name))
        else:
            flat[name] = value
    return flat


def _absolute_spec(spec: Mapping[str, Any], ckpt_dir: epath.Path) -> dict[str, Any]:
    """A TensorStore spec that opens the array a stored (relative) spec points to."""
    kvstore = spec.get("kvstore") if isinstance(spec.get("kvstore"), Mapping) else {}
    rel = kvstore.get("path") or spec.get("path")
    if not isinstance(rel, str) or not rel:
        raise UnknownFormatError(f"TensorStore spec without a path: {dict(spec)}")
    return {"driver": spec["driver"], "kvstore": _join_kvstore(kvstore_spec(ckpt_dir), rel)}


def _placeholder_spec(placeholder: str, ckpt_dir: epath.Path) -> dict[str, Any]:
    """A TensorStore spec for Orbax's ``PLACEHOLDER://<name>`` leaf."""
    name = placeholder[len(PLACEHOLDER_PREFIX) :]
    base = kvstore_spec(ckpt_dir)
    if (ckpt_dir / "manifest.ocdbt").exists():
        base = {**base, "path": base["path"].rstrip("/") + "/"}
        return {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": base, "path": name}}
    return {"driver": "zarr", "kvstore": _join_kvstore(base, name)}


def _join_kvstore(kvstore: dict[str, Any], rel: str) -> dict[str, Any]:
    base = kvstore["path"].rstrip("/")
    return {**kvstore, "path": f"{base}/{rel.strip('/')}/" if base else f"{rel.strip('/')}/"}


def read_t5x(path: PathLike, lazy: bool = False) -> tuple[Params, dict[str, Any]]:
    """``(params, info)`` from a T5X checkpoint; params keep their stored dtype.

    ``info`` has "file" (the msgpack file), "version" and "step" (or None). With
    ``lazy=True`` the tensors stored out of line come back as ``LazyTensor``s: only
    their metadata is read (enough to infer the config), and slices are read on demand.
    """
    ckpt_file = find_checkpoint(path)
    raw = ckpt_file.read_bytes()
    try:
        contents = serialization.msgpack_restore(raw)
    except Exception as e:  # msgpack raises several unrelated types
        raise UnknownFormatError(f"{ckpt_file}: not a T5X msgpack checkpoint ({e})") from e
    if not isinstance(contents, dict):
        raise UnknownFormatError(f"{ckpt_file}: not a T5X checkpoint (not a msgpack dict)")
    version = int(contents.get("version", 0))
    state = contents.get("optimizer", contents) if version >= 1 else contents
    target = state.get("target") if isinstance(state, dict) else None
    if not isinstance(target, dict):
        raise UnknownFormatError(
            f"{ckpt_file}: no 'target' (model parameters) in the checkpoint; "
            f"top-level keys: {sorted(contents)}"
        )

    flat = _flatten_target(target)
    ckpt_dir = ckpt_file.parent
    pending: dict[str, tuple[Any, Mapping[str, Any], dict[str, Any]]] = {}
    for name, leaf in flat.items():
        if _is_ts_spec(leaf) or (isinstance(leaf, str) and leaf.startswith(PLACEHOLDER_PREFIX)):
            if isinstance(leaf, str):
                stored, spec = {}, _placeholder_spec(leaf, ckpt_dir)
            else:
                stored, spec = leaf, _absolute_spec(leaf, ckpt_dir)
            pending[name] = (ts.open(spec, open=True, read=True), stored, spec)
        elif not isinstance(leaf, np.ndarray | np.generic | int | float):
            raise UnknownFormatError(
                f"{ckpt_file}: tensor {name!r} is neither an array nor a TensorStore spec "
                f"({type(leaf).__name__})"
            )
    reads = {}
    for name, (future, stored, spec) in pending.items():
        try:
            store = future.result()
        except ValueError as e:
            raise MissingTensorError(
                f"{ckpt_file}: tensor {name!r}: cannot open its TensorStore array "
                f"({spec['kvstore']['path']}): {e}"
            ) from e
        meta_shape = stored.get("metadata", {}).get("shape")
        if meta_shape is not None and tuple(meta_shape) != tuple(store.shape):
            raise ShapeMismatchError(
                f"{ckpt_file}: tensor {name!r} is recorded with shape {tuple(meta_shape)} "
                f"but its TensorStore array has shape {tuple(store.shape)}"
            )
        if lazy:
            dtype = _stored_dtype(store.dtype.numpy_dtype, version)
            read = functools.partial(_read_slice, store, version)
            flat[name] = LazyTensor(tuple(store.shape), dtype, read, f"{ckpt_file}:{name}")
        else:
            reads[name] = store.read()
    for name, future in reads.items():
        arr = np.asarray(future.result())
        flat[name] = arr.view(_stored_dtype(arr.dtype, version))
    flat = {k: v if isinstance(v, LazyTensor) else np.asarray(v) for k, v in flat.items()}
    step = state.get("state", {}).get("step") if isinstance(state.get("state"), dict) else None
    if not isinstance(step, int | np.integer | np.ndarray) or np.size(step) != 1:
        step = None  # absent, or itself stored out of line
    info = {"file": ckpt_file, "version": version, "step": None if step is None else int(step)}
    return unflatten(flat), info


def _stored_dtype(dtype: np.dtype, version: int) -> np.dtype:
    """Version 2 wrote bfloat16 as uint16."""
    return np.dtype(ml_dtypes.bfloat16) if version <= 2 and dtype == np.uint16 else dtype


def _read_slice(store: ts.TensorStore, version: int, index: Index) -> np.ndarray:
    arr = np.asarray(store[index].read().result())
    return arr.view(_stored_dtype(arr.dtype, version))


def load_t5x(path: PathLike, config: T5Config | None = None) -> Params:
    """Model parameters (fp32 numpy) from a T5X checkpoint file, step dir or model dir.

    With ``config``, the tensors and shapes are checked against it.
    """
    params, info = read_t5x(path)
    params = to_float32(params)
    if config is not None:
        check_params(params, config, str(info["file"]))
    return params


# --------------------------------------------------------------------------- writing


def _chunk_shape(shape: tuple[int, ...], itemsize: int) -> list[int]:
    """Chunks dividing ``shape``, at most ~64 MiB, splitting the largest dimension first."""
    chunks = [max(1, d) for d in shape]
    while chunks and int(np.prod(chunks)) * itemsize > _CHUNK_BYTES:
        i = int(np.argmax(chunks))
        if chunks[i] == 1:
            break
        factor = next(f for f in range(2, chunks[i] + 1) if chunks[i] % f == 0)
        chunks[i] //= factor
    return chunks


_WRITES_IN_FLIGHT = 4


def save_t5x(
    path: PathLike,
    params: Mapping[str, Any],
    step: int,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
) -> epath.Path:
    """Write ``params`` as T5X checkpoint ``<path>/checkpoint_<step>``; returns that dir.

    Every parameter becomes a gzip-compressed zarr array (``dtype`` "float32" or
    "bfloat16") named ``target.<a>.<b>...``; the msgpack ``checkpoint`` file is written
    last. Only the model parameters and the step are saved (no optimizer slots): to
    restore into a T5X train state, let T5X fall back for ``state/param_states``.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    ckpt_dir = as_path(path) / f"checkpoint_{int(step)}"
    if (ckpt_dir / CHECKPOINT_FILE).exists() and not overwrite:
        raise CheckpointError(f"{ckpt_dir}: a checkpoint already exists (pass overwrite=True)")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    base_kvstore = kvstore_spec(ckpt_dir)
    np_dtype = _DTYPES[dtype]
    specs: dict[str, Any] = {}
    writes = []
    for name, value in flatten(params).items():
        arr = np.ascontiguousarray(np.asarray(value).astype(np_dtype))
        rel = "target." + name.replace("/", ".")
        metadata = {
            "compressor": {"id": "gzip"},
            "shape": list(arr.shape),
            "chunks": _chunk_shape(arr.shape, arr.itemsize),
        }
        if is_gcs(path):
            kvstore = {"driver": "gcs", "bucket": DUMMY_BUCKET, "path": rel}
        else:
            kvstore = {"driver": "file", "path": rel}
        specs[name] = {"driver": "zarr", "dtype": dtype, "kvstore": kvstore, "metadata": metadata}
        store = ts.open(
            {
                "driver": "zarr",
                "dtype": dtype,
                "kvstore": _join_kvstore(base_kvstore, rel),
                "metadata": metadata,
            },
            create=True,
            delete_existing=True,
        ).result()
        writes.append(store.write(arr))
        while len(writes) > _WRITES_IN_FLIGHT:  # bounded host memory for lazy params
            writes.pop(0).result()
    for write in writes:
        write.result()
    contents = {
        "version": VERSION,
        "optimizer": {
            "target": unflatten(specs),
            "state": {"step": np.asarray(int(step), dtype=np.int32)},
        },
    }
    (ckpt_dir / CHECKPOINT_FILE).write_bytes(serialization.msgpack_serialize(contents))
    return ckpt_dir

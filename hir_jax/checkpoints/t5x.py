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

T5X's Orbax layout (``train.py``'s ``use_orbax=True``, the default since 2024) has no
msgpack file: ``checkpoint_<step>/{_CHECKPOINT_METADATA, state/, dataset/}``, where
``state`` is an Orbax pytree item ``{"target": <params>, "state": <optimizer state>}``:
its ``_METADATA`` lists the tree, and leaf ``("target", "encoder", ...)`` is the array
``target.encoder....`` (zarr, or zarr3 when ``use_zarr3``), in the item's OCDBT store or a
directory of that name. Only the ``target`` arrays are ever opened. Our own MODEL_DIR
checkpoints are Orbax too, but their ``state`` tree has ``params``, not ``target``.
"""

from __future__ import annotations

import ast
import functools
import json
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
ORBAX_STATE = "state"  # T5X's Orbax item holding {"target", "state"}
ORBAX_TREE_METADATA = "_METADATA"  # an Orbax pytree item's tree
ORBAX_STEP_METADATA = "_CHECKPOINT_METADATA"  # an Orbax step directory's
ORBAX_COMMIT_FILE = "commit_success.txt"  # marks a finished Orbax save on gs://
_OCDBT_CACHE_BYTES = 100 * 1024 * 1024
_STEP_DIR_RE = re.compile(r"^checkpoint_(\d+)$")
_CHUNK_BYTES = 64 * 1024 * 1024
_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


# --------------------------------------------------------------------------- finding


def _steps_with(model_dir: epath.Path, pattern: str, depth: int) -> set[int]:
    """Steps of the ``checkpoint_<step>`` dirs holding a file matching ``pattern`` (``depth``
    levels below the step dir)."""
    steps = set()
    for found in model_dir.glob(f"checkpoint_*/{pattern}"):
        step_dir = found
        for _ in range(depth):
            step_dir = step_dir.parent
        match = _STEP_DIR_RE.match(step_dir.name)
        if match:
            steps.add(int(match.group(1)))
    return steps


def all_steps(model_dir: PathLike) -> list[int]:
    """Steps of the complete T5X checkpoints in ``model_dir``, sorted: ``checkpoint_<step>``
    dirs with a msgpack ``checkpoint`` file or an Orbax ``state`` item.

    Orbax saves to a temporary name and renames it when done, except on ``gs://``, where a
    step is complete once ``commit_success.txt`` is written: there steps without it are
    left out (they may still be being written).
    """
    model_dir = as_path(model_dir)
    steps = _steps_with(model_dir, CHECKPOINT_FILE, 1)
    orbax = _steps_with(model_dir, f"{ORBAX_STATE}/{ORBAX_TREE_METADATA}", 2)
    orbax |= _steps_with(model_dir, f"{ORBAX_STATE}/{CHECKPOINT_FILE}", 2)
    if orbax and is_gcs(model_dir):
        orbax &= _steps_with(model_dir, ORBAX_COMMIT_FILE, 1)
    return sorted(steps | orbax)


def is_tf_checkpoint_index(path: PathLike) -> bool:
    """True if ``path`` is TensorFlow's text ``checkpoint`` index (Mesh TF T5), not msgpack."""
    with as_path(path).open("rb") as f:
        return f.read(32).startswith(b"model_checkpoint_path")


def is_orbax_dir(path: PathLike) -> bool:
    """True if directory ``path`` looks like Orbax wrote it (a step dir or a pytree item)."""
    p = as_path(path)
    return any(
        (p / name).exists() for name in (ORBAX_STEP_METADATA, ORBAX_TREE_METADATA, ORBAX_STATE)
    )


def _in_step_dir(directory: epath.Path) -> epath.Path | None:
    """The checkpoint directly in ``directory``, if any: its msgpack ``checkpoint`` file, or
    the Orbax pytree item (``directory`` itself, or its ``state`` item)."""
    msgpack_file = directory / CHECKPOINT_FILE
    if msgpack_file.exists() and not msgpack_file.is_dir():
        return msgpack_file
    if (directory / ORBAX_TREE_METADATA).exists():
        return directory
    state = directory / ORBAX_STATE
    if (state / ORBAX_TREE_METADATA).exists():
        return state
    if (state / CHECKPOINT_FILE).exists():  # Orbax before its _METADATA file (2023)
        return state / CHECKPOINT_FILE
    return None


def find_checkpoint(path: PathLike) -> epath.Path:
    """The checkpoint for a file, a ``checkpoint_<step>`` dir or a model dir (its highest
    step): the msgpack ``checkpoint`` file, or for T5X's Orbax layout
    (``checkpoint_<step>/state``, T5X's ``use_orbax=True``) the ``state`` item directory.

    An Orbax directory that is not T5X's (no ``target`` in its tree, e.g. one of our own
    MODEL_DIR checkpoints) raises UnknownFormatError.
    """
    path = as_path(path)
    if not path.exists():
        raise NoCheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        found = _in_step_dir(path)
        if found is None:
            steps = all_steps(path)
            if steps:
                found = _in_step_dir(path / f"checkpoint_{steps[-1]}")
            elif is_orbax_dir(path):
                raise UnknownFormatError(_not_t5x_orbax(path, "it has no 'state' item"))
            if found is None:
                raise NoCheckpointError(
                    f"{path}: no T5X checkpoint; looked for {path / CHECKPOINT_FILE}, "
                    f"{path / ORBAX_STATE}/ and {path}/checkpoint_<step>/{CHECKPOINT_FILE} "
                    f"or {ORBAX_STATE}/"
                )
        path = found
    if path.is_dir():
        _target_leaves(path)  # refuses an Orbax tree without T5X's "target"
        return path
    if is_tf_checkpoint_index(path):
        raise UnknownFormatError(
            f"{path}: a TensorFlow (Mesh TF) checkpoint index, not a T5X msgpack checkpoint; "
            "convert it with T5X's checkpoint importer first"
        )
    return path


def _not_t5x_orbax(path: epath.Path, why: str) -> str:
    """The one-line message for an Orbax directory that is not a T5X checkpoint."""
    step_dir = path.parent if path.name == ORBAX_STATE else path
    ours = (step_dir / "loop").exists() or (step_dir / "hir_files.json").exists()
    hint = (
        "; it is one of our own MODEL_DIR training checkpoints: pass the MODEL_DIR to "
        "python -m hir_jax.convert"
        if ours
        else ""
    )
    return (
        f"{path}: an Orbax checkpoint, not an HF or T5X model checkpoint ({why}; T5X's has a "
        f"msgpack '{CHECKPOINT_FILE}' file or a '{ORBAX_STATE}' item holding 'target'){hint}"
    )


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


def _orbax_array_spec(
    item_dir: epath.Path, name: str, zarr3: bool = False, ocdbt: bool | None = None
) -> dict[str, Any]:
    """A TensorStore spec for array ``name`` of an Orbax pytree item: key ``name`` of the
    item's OCDBT store (``ocdbt``; None: when it has ``manifest.ocdbt``), else the zarr
    array ``<item>/<name>``."""
    driver = "zarr3" if zarr3 else "zarr"
    base = kvstore_spec(item_dir)
    if ocdbt is None:
        ocdbt = _has_ocdbt(item_dir)
    if ocdbt:
        base = {**base, "path": base["path"].rstrip("/") + "/"}
        kvstore = {"driver": "ocdbt", "base": base, "path": name, "cache_pool": "cache_pool#ocdbt"}
        return {"driver": driver, "kvstore": kvstore}
    return {"driver": driver, "kvstore": _join_kvstore(base, name)}


def _has_ocdbt(item_dir: epath.Path) -> bool:
    return (item_dir / "manifest.ocdbt").exists()


def _placeholder_spec(placeholder: str, ckpt_dir: epath.Path, ocdbt: bool) -> dict[str, Any]:
    """A TensorStore spec for Orbax's ``PLACEHOLDER://<name>`` leaf."""
    return _orbax_array_spec(ckpt_dir, placeholder[len(PLACEHOLDER_PREFIX) :], ocdbt=ocdbt)


def _join_kvstore(kvstore: dict[str, Any], rel: str) -> dict[str, Any]:
    base = kvstore["path"].rstrip("/")
    return {**kvstore, "path": f"{base}/{rel.strip('/')}/" if base else f"{rel.strip('/')}/"}


def _read_json(path: epath.Path) -> Any:
    try:
        return json.loads(path.read_text())
    except ValueError as e:  # JSON and UTF-8 decoding errors
        raise UnknownFormatError(f"{path}: not readable as Orbax metadata ({e})") from e


def _tree_keys(key: str, entry: Mapping[str, Any]) -> tuple[str, ...]:
    """The path of one entry of Orbax's ``tree_metadata`` (its ``key_metadata``, else the
    entry's name, a tuple literal such as ``"('target', 'encoder')"``)."""
    keys = entry.get("key_metadata") if isinstance(entry, Mapping) else None
    if isinstance(keys, list) and keys:
        return tuple(str(k["key"]) if isinstance(k, Mapping) else str(k) for k in keys)
    try:
        parsed = ast.literal_eval(key)
    except (ValueError, SyntaxError):
        parsed = (key,)
    return tuple(str(k) for k in (parsed if isinstance(parsed, tuple) else (parsed,)))


def _target_leaves(item_dir: epath.Path) -> tuple[dict[str, str], bool]:
    """``({our name: Orbax array name}, zarr3)`` for the ``target`` subtree of an Orbax
    pytree item, from its ``_METADATA`` alone: nothing of the optimizer state is opened.

    Raises UnknownFormatError for an Orbax tree without ``target`` (not T5X's).
    """
    metadata = _read_json(item_dir / ORBAX_TREE_METADATA)
    tree = metadata.get("tree_metadata") if isinstance(metadata, Mapping) else None
    if not isinstance(tree, Mapping):
        raise UnknownFormatError(
            f"{item_dir / ORBAX_TREE_METADATA}: no 'tree_metadata'; not an Orbax pytree item"
        )
    leaves, top = {}, set()
    for key, entry in tree.items():
        keys = _tree_keys(key, entry)
        top.add(keys[0])
        value = entry.get("value_metadata", {}) if isinstance(entry, Mapping) else {}
        if keys[0] != "target" or len(keys) < 2 or value.get("skip_deserialize"):
            continue  # the optimizer state, or an empty node / None
        leaves["/".join(keys[1:])] = ".".join(keys)
    if not leaves:
        why = f"its tree has no 'target' (top-level keys: {', '.join(sorted(top)) or 'none'})"
        raise UnknownFormatError(_not_t5x_orbax(item_dir, why))
    return leaves, bool(metadata.get("use_zarr3", False))


def _open_context() -> ts.Context:
    """One TensorStore context for a checkpoint's arrays (an OCDBT store's b-tree is
    read once for all of them)."""
    return ts.Context({"cache_pool#ocdbt": {"total_bytes_limit": _OCDBT_CACHE_BYTES}})


def _read_msgpack(ckpt_file: epath.Path) -> tuple[dict[str, Any], dict, int, int | None]:
    """``(flat target, {name: (stored spec, TensorStore spec)}, version, step)`` of a
    msgpack checkpoint; the flat target has the leaves stored inline."""
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
    specs: dict[str, tuple[Mapping[str, Any], dict[str, Any]]] = {}
    ocdbt = None
    for name, leaf in flat.items():
        if isinstance(leaf, str) and leaf.startswith(PLACEHOLDER_PREFIX):
            ocdbt = _has_ocdbt(ckpt_dir) if ocdbt is None else ocdbt
            specs[name] = ({}, _placeholder_spec(leaf, ckpt_dir, ocdbt))
        elif _is_ts_spec(leaf):
            specs[name] = (leaf, _absolute_spec(leaf, ckpt_dir))
        elif not isinstance(leaf, np.ndarray | np.generic | int | float):
            raise UnknownFormatError(
                f"{ckpt_file}: tensor {name!r} is neither an array nor a TensorStore spec "
                f"({type(leaf).__name__})"
            )
    inline = {k: np.asarray(v) for k, v in flat.items() if k not in specs}
    step = state.get("state", {}).get("step") if isinstance(state.get("state"), dict) else None
    if not isinstance(step, int | np.integer | np.ndarray) or np.size(step) != 1:
        step = None  # absent, or itself stored out of line
    return inline, specs, version, None if step is None else int(step)


def read_t5x(path: PathLike, lazy: bool = False) -> tuple[Params, dict[str, Any]]:
    """``(params, info)`` from a T5X checkpoint; params keep their stored dtype.

    ``info`` has "file" (the msgpack file, or the Orbax ``state`` item directory),
    "format" ("msgpack" or "orbax"), "version" (msgpack's; None for Orbax) and "step" (or
    None). Of an Orbax checkpoint only ``target`` is read, never the optimizer state;
    its step is the directory's. With ``lazy=True`` the tensors stored out of line come
    back as ``LazyTensor``s: only their metadata is read (enough to infer the config),
    and slices are read on demand.
    """
    ckpt = find_checkpoint(path)
    context = _open_context()
    if ckpt.is_dir():  # T5X's Orbax layout: checkpoint_<step>/state
        names, zarr3 = _target_leaves(ckpt)
        flat: dict[str, Any] = {}
        ocdbt = _has_ocdbt(ckpt)
        specs = {k: ({}, _orbax_array_spec(ckpt, v, zarr3, ocdbt)) for k, v in names.items()}
        version, match = None, _STEP_DIR_RE.match(ckpt.parent.name)
        info = {"file": ckpt, "format": "orbax", "version": None}
        info["step"] = int(match.group(1)) if match else None
    else:
        flat, specs, version, step = _read_msgpack(ckpt)
        info = {"file": ckpt, "format": "msgpack", "version": version, "step": step}
    opened = {
        name: (ts.open(spec, open=True, read=True, context=context), stored, spec)
        for name, (stored, spec) in specs.items()
    }
    reads = {}
    for name, (future, stored, spec) in opened.items():
        try:
            store = future.result()
        except ValueError as e:
            raise MissingTensorError(
                f"{ckpt}: tensor {name!r}: cannot open its TensorStore array "
                f"({spec['kvstore']['path']}): {e}"
            ) from e
        meta_shape = stored.get("metadata", {}).get("shape")
        if meta_shape is not None and tuple(meta_shape) != tuple(store.shape):
            raise ShapeMismatchError(
                f"{ckpt}: tensor {name!r} is recorded with shape {tuple(meta_shape)} "
                f"but its TensorStore array has shape {tuple(store.shape)}"
            )
        if lazy:
            dtype = _stored_dtype(store.dtype.numpy_dtype, version)
            read = functools.partial(_read_slice, store, version)
            flat[name] = LazyTensor(tuple(store.shape), dtype, read, f"{ckpt}:{name}")
        else:
            reads[name] = store.read()
    for name, future in reads.items():
        arr = np.asarray(future.result())
        flat[name] = arr.view(_stored_dtype(arr.dtype, version))
    return unflatten(flat), info


def _stored_dtype(dtype: np.dtype, version: int | None) -> np.dtype:
    """Version 2 wrote bfloat16 as uint16 (Orbax, version None, never did)."""
    if version is not None and version <= 2 and dtype == np.uint16:
        return np.dtype(ml_dtypes.bfloat16)
    return dtype


def _read_slice(store: ts.TensorStore, version: int | None, index: Index) -> np.ndarray:
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

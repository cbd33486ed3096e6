"""A small safetensors reader/writer through the path layer, bf16 included.

The format: 8 bytes little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the tensor bytes (offsets relative to the end of the header). ``safetensors.numpy``
cannot return bfloat16, so tensors are read from their byte ranges here, with
``ml_dtypes`` supplying the numpy bfloat16/float8 types.
"""

from __future__ import annotations

import functools
import json
import os
import struct
from collections.abc import Iterable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from hir_jax.checkpoints.errors import CheckpointError, MissingTensorError
from hir_jax.checkpoints.lazy import Index, LazyTensor
from hir_jax.paths import PathLike, as_path, is_gcs

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def read_header(path: PathLike) -> tuple[dict[str, Any], int]:
    """(header without "__metadata__", byte offset where tensor data starts)."""
    path = as_path(path)
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER:
            raise CheckpointError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not a safetensors file (bad header: {e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    return header, 8 + n


def _layout(path: Any, header: Mapping[str, Any], name: str) -> tuple[np.dtype, tuple, int, int]:
    """(dtype, shape, begin, end) of tensor ``name``, checked against its byte range."""
    if name not in header:
        raise MissingTensorError(f"{path}: missing tensor {name!r}")
    info = header[name]
    if info["dtype"] not in DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']!r}")
    dtype = DTYPES[info["dtype"]]
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise CheckpointError(
            f"{path}: tensor {name!r} byte range {begin}..{end} does not fit "
            f"shape {shape} {info['dtype']}"
        )
    return dtype, shape, begin, end


def _read_range(path: Any, offset: int, size: int, name: str) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        buf = f.read(size)
    if len(buf) != size:
        raise CheckpointError(f"{path}: tensor {name!r} is truncated")
    return buf


def read_tensors(path: PathLike, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Read ``names`` (default: all) from one safetensors file, in their stored dtype."""
    return {name: tensor[()] for name, tensor in lazy_tensors(path, names).items()}


def lazy_tensors(path: PathLike, names: Iterable[str] | None = None) -> dict[str, LazyTensor]:
    """``names`` (default: all) as ``LazyTensor``s in their stored dtype.

    Local files are memory-mapped, so a slice reads only the pages it covers; ``gs://``
    files are read by byte range: the rows (first dimension) a slice covers.
    """
    path = as_path(path)
    header, start = read_header(path)
    wanted = list(header) if names is None else list(names)
    file_size = path.stat().length
    out: dict[str, LazyTensor] = {}
    for name in wanted:
        dtype, shape, begin, end = _layout(path, header, name)
        if start + end > file_size:
            raise CheckpointError(f"{path}: tensor {name!r} is truncated")
        read = functools.partial(_read_slice, path, start + begin, end - begin, dtype, shape, name)
        out[name] = LazyTensor(shape, dtype, read, str(path))
    return out


def _read_slice(
    path: Any, offset: int, size: int, dtype: np.dtype, shape: tuple, name: str, index: Index
) -> np.ndarray:
    if size == 0:
        return np.zeros(shape, dtype)[index]
    if is_gcs(path) and shape:  # no memory map: read the rows the slice covers
        first, stop, step = index[0].indices(shape[0])
        row_bytes = size // shape[0]
        count = max(stop - first, 0)
        buf = _read_range(path, offset + first * row_bytes, count * row_bytes, name)
        rows = np.frombuffer(buf, dtype).reshape((count, *shape[1:]))
        return rows[(slice(None, None, step), *index[1:])]
    if is_gcs(path):
        return np.frombuffer(_read_range(path, offset, size, name), dtype).reshape(shape)[index]
    mapped = np.memmap(os.fspath(path), dtype=dtype, mode="r", offset=offset, shape=shape)
    return mapped[index]  # LazyTensor copies it out of the mapping


def write_tensors(
    path: PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> int:
    """Write ``tensors`` (numpy, any dtype in :data:`DTYPES`) as one safetensors file.

    Returns the number of tensor bytes written.
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    arrays: list[np.ndarray] = []
    offset = 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype not in _NAMES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {arr.dtype}")
        header[name] = {
            "dtype": _NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
        arrays.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data aligned to 8 bytes, as the reference writer does
    with as_path(path).open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in arrays:
            f.write(arr.tobytes())
    return offset

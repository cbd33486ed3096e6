"""Checkpoint tensors read on demand, a slice at a time, and placed on a mesh that way.

A ``LazyTensor`` knows its shape and dtype and reads any rectangular slice of itself from
its file. ``place`` puts a tree of them on devices with ``jax.make_array_from_callback``,
which asks only for the slices of this process's devices: on a pod, each host reads its
own shards of a model-parallel kernel, and no host ever holds the whole model in memory
(at most one tensor's local slices at a time). NumPy leaves are placed as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

Index = tuple[slice, ...]
Reader = Callable[[Index], np.ndarray]


class LazyTensor:
    """A tensor not yet read: ``t[index]`` reads that slice (a fresh array of ``dtype``).

    ``read`` may return a view (of a memory map, of an in-memory array); ``t[index]``
    always copies it into memory of its own, so placed arrays never alias the source.
    """

    def __init__(self, shape: tuple[int, ...], dtype: Any, read: Reader, source: str) -> None:
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.source = source  # named in errors and reprs
        self._read = read

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return f"LazyTensor(shape={self.shape}, dtype={self.dtype}, source={self.source!r})"

    def _index(self, index: Any) -> Index:
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > self.ndim or not all(isinstance(i, slice) for i in index):
            raise IndexError(f"{self!r}: only a tuple of slices selects a slice, got {index}")
        return tuple(index) + (slice(None),) * (self.ndim - len(index))

    def __getitem__(self, index: Any) -> np.ndarray:
        data = np.asarray(self._read(self._index(index)))
        return np.array(data, dtype=self.dtype, copy=True, order="C")

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        full = self[()]
        return full if dtype is None else full.astype(dtype)

    def astype(self, dtype: Any) -> LazyTensor:
        """The same tensor, converted to ``dtype`` as it is read."""
        return LazyTensor(self.shape, dtype, self._read, self.source)

    @property
    def T(self) -> LazyTensor:  # noqa: N802 (numpy's name)
        """The transpose, read as slices of the stored (untransposed) tensor."""
        read = self._read
        return LazyTensor(
            self.shape[::-1], self.dtype, lambda index: read(index[::-1]).T, self.source
        )


def from_array(array: np.ndarray, source: str) -> LazyTensor:
    """An in-memory array behind the same interface (formats that cannot be sliced on disk)."""
    return LazyTensor(array.shape, array.dtype, lambda index: array[index], source)


def materialize(tree: Any) -> Any:
    """Every ``LazyTensor`` leaf read whole (NumPy arrays)."""
    return jax.tree.map(lambda x: np.asarray(x) if isinstance(x, LazyTensor) else x, tree)


def place(tree: Any, shardings: Any) -> Any:
    """``jax.device_put(tree, shardings)``, except that ``LazyTensor`` leaves are read one
    addressable shard at a time (each distinct slice once, however many devices hold it)."""

    def one(leaf: Any, sharding: jax.sharding.Sharding) -> Any:
        if not isinstance(leaf, LazyTensor):
            return jax.device_put(leaf, sharding)
        slices: dict[tuple[tuple[Any, Any, Any], ...], np.ndarray] = {}

        def shard(index: Index) -> np.ndarray:
            key = tuple((s.start, s.stop, s.step) for s in index)
            if key not in slices:
                slices[key] = leaf[index]
            return slices[key]

        return jax.make_array_from_callback(leaf.shape, sharding, shard)

    return jax.tree.map(one, tree, shardings)

"""Lazy checkpoint loading: the same parameters as an eager load, and placing them on a
mesh reads exactly each device's slice of every tensor, each distinct slice once."""

from __future__ import annotations

import jax
import ml_dtypes
import numpy as np
import pytest

from hir_jax.checkpoints import (
    CheckpointError,
    flatten,
    hf_name_map,
    load_checkpoint,
    safetensors_io,
    save_hf,
    save_t5x,
)
from hir_jax.checkpoints.lazy import LazyTensor, materialize
from hir_jax.model.configs import get_config
from hir_jax.model.t5 import init_params
from hir_jax.partitioning import make_partitioner
from hir_jax.train import create_train_state, make_optimizer, train_state_shardings

# Every dimension divides a 2 (data, FSDP) x 4 (model) mesh.
CONFIG = get_config("tiny", vocab_size=128, num_encoder_layers=2, num_decoder_layers=2)


@pytest.fixture(scope="module")
def params():
    return jax.tree.map(np.asarray, init_params(CONFIG, jax.random.key(7)))


def _write(kind, directory, params):
    if kind == "hf":
        save_hf(directory, CONFIG, params)
    elif kind == "hf_bf16_sharded":
        save_hf(directory, CONFIG, params, dtype="bfloat16", max_shard_size="100KB")
        assert len(list(directory.glob("model-*.safetensors"))) > 2
    else:
        save_t5x(directory, params, step=1, dtype="bfloat16")
    return directory


@pytest.mark.parametrize("kind", ["hf", "hf_bf16_sharded", "t5x_bf16"])
def test_lazy_load_matches_eager_load(tmp_path, params, kind):
    directory = _write(kind, tmp_path / kind, params)
    config, eager = load_checkpoint(directory)
    lazy_config, lazy = load_checkpoint(directory, lazy=True)
    assert lazy_config == config
    flat_lazy, flat_eager = flatten(lazy), flatten(eager)
    assert all(isinstance(t, LazyTensor) for t in flat_lazy.values())
    jax.tree.map(np.testing.assert_array_equal, materialize(lazy), eager)
    for name, tensor in flat_lazy.items():
        assert tensor.shape == flat_eager[name].shape and tensor.dtype == np.float32
        rows = slice(1, tensor.shape[0] - 1)
        cols = (slice(tensor.shape[-1] // 2, None),) if tensor.ndim == 2 else ()
        np.testing.assert_array_equal(tensor[(rows, *cols)], flat_eager[name][(rows, *cols)])
    if kind != "hf":  # bf16 on disk: converted to float32 exactly
        want = params["decoder"]["layers_1"]["mlp"]["wo"]["kernel"].astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(
            np.asarray(lazy["decoder"]["layers_1"]["mlp"]["wo"]["kernel"]), want.astype(np.float32)
        )


def _bounds(index, shape):
    """((start, stop) per dimension) of a tuple of slices."""
    return tuple(
        (s.start or 0, n if s.stop is None else s.stop) for s, n in zip(index, shape, strict=True)
    )


def test_placing_reads_only_each_devices_slice_once(tmp_path, params, monkeypatch):
    directory = _write("hf", tmp_path / "hf", params)
    reads: dict[str, list[tuple[tuple[int, int], ...]]] = {}
    original = safetensors_io._read_slice

    def recording(path, offset, size, dtype, shape, name, index):
        reads.setdefault(name, []).append(
            tuple(
                (s.start or 0, shape[d] if s.stop is None else s.stop) for d, s in enumerate(index)
            )
        )
        return original(path, offset, size, dtype, shape, name, index)

    monkeypatch.setattr(safetensors_io, "_read_slice", recording)
    partitioner = make_partitioner(data=2, model=4, fsdp=True)
    optimizer = make_optimizer()
    _, lazy = load_checkpoint(directory, lazy=True)
    assert not reads  # loading read nothing
    state = create_train_state(CONFIG, lazy, optimizer, partitioner, jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), params)

    shardings = flatten(train_state_shardings(CONFIG, optimizer, partitioner).params)
    split = 0
    for ours, (theirs, transpose) in hf_name_map(CONFIG).items():
        sharding, shape = shardings[ours], flatten(params)[ours].shape
        slices = {_bounds(i, shape) for i in sharding.devices_indices_map(shape).values()}
        want = sorted(tuple(r[::-1]) if transpose else r for r in slices)
        assert sorted(reads[theirs]) == want, ours  # each device's slice, once
        split += len(want) > 1
    assert split >= 10  # most kernels are split over the mesh, so no read is whole
    mlp = reads["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"]
    assert len(mlp) == 8 and {(b - a) * (d - c) for (a, b), (c, d) in mlp} == {128 * 64 // 8}


@pytest.mark.parametrize("lazy", [False, True])
def test_truncated_safetensors_is_named_before_anything_is_read(tmp_path, params, lazy):
    directory = _write("hf", tmp_path / "hf", params)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor .* is truncated"):
        load_checkpoint(directory, lazy=lazy)


def test_remote_files_read_only_the_rows_a_slice_covers(tmp_path, params, monkeypatch):
    directory = _write("hf", tmp_path / "hf", params)
    monkeypatch.setattr(safetensors_io, "is_gcs", lambda path: True)  # read as gs:// is
    sizes = []
    original = safetensors_io._read_range

    def recording(path, offset, size, name):
        sizes.append((name, size))
        return original(path, offset, size, name)

    monkeypatch.setattr(safetensors_io, "_read_range", recording)
    _, eager = load_checkpoint(directory)
    _, lazy = load_checkpoint(directory, lazy=True)
    jax.tree.map(np.testing.assert_array_equal, materialize(lazy), eager)
    sizes.clear()
    embedding = lazy["token_embedder"]["embedding"]  # HF "shared.weight", not transposed
    np.testing.assert_array_equal(
        embedding[8:24:3, 5:9], eager["token_embedder"]["embedding"][8:24:3, 5:9]
    )
    assert sizes == [("shared.weight", 16 * CONFIG.d_model * 4)]  # rows 8..23 only


def test_save_hf_reads_lazy_params_one_shard_at_a_time(tmp_path, params, monkeypatch):
    read: list[str] = []

    def lazy_leaf(path, array):
        name = jax.tree_util.keystr(path)
        return LazyTensor(array.shape, array.dtype, lambda i: read.append(name) or array[i], name)

    lazy = jax.tree_util.tree_map_with_path(lazy_leaf, params)
    read_at_write = []
    original = safetensors_io.write_tensors

    def recording(path, tensors, metadata=None):
        read_at_write.append((len(tensors), len(read)))
        return original(path, tensors, metadata)

    monkeypatch.setattr(safetensors_io, "write_tensors", recording)
    save_hf(tmp_path / "hf", CONFIG, lazy, max_shard_size="100KB")
    sizes = [n for n, _ in read_at_write]
    assert len(sizes) > 2 and len(read) == len(flatten(params))  # each tensor read once
    # When shard i is written, only the tensors of shards 0..i have been read.
    assert [r for _, r in read_at_write] == list(np.cumsum(sizes))
    _, loaded = load_checkpoint(tmp_path / "hf")
    jax.tree.map(np.testing.assert_array_equal, loaded, params)

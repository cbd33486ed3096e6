"""T5X's Orbax checkpoints (``use_orbax=True``: ``checkpoint_<step>/state`` with ``target``
and the Adafactor state, no msgpack file), written here with orbax itself: loaded eagerly
and lazily on a simulated mesh, they give exactly the logits of the same parameters
saved as a legacy T5X checkpoint; the optimizer state is never opened."""

from __future__ import annotations

import functools
import json
import shutil

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from hir_jax import convert
from hir_jax.checkpoints import (
    MissingTensorError,
    NoCheckpointError,
    UnknownFormatError,
    detect_format,
    find_vocabulary,
    flatten,
    load_checkpoint,
    load_config,
    read_t5x,
    save_t5x,
    t5x,
)
from hir_jax.checkpoints.lazy import LazyTensor
from hir_jax.checkpoints.state import StateCheckpointer
from hir_jax.model import t5
from hir_jax.model.configs import get_config
from hir_jax.partitioning import make_partitioner
from hir_jax.paths import as_path
from hir_jax.train import create_train_state, make_optimizer, train_state_shardings

# Every dimension divides a 2 (data, FSDP) x 4 (model) mesh.
CONFIG = get_config("tiny", vocab_size=128, num_encoder_layers=2, num_decoder_layers=2)
STEP = 1_100_000
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


@pytest.fixture(scope="module")
def params():
    return jax.tree.map(np.asarray, t5.init_params(CONFIG, jax.random.key(3)))


def _adafactor_state(params, rng):
    """T5X Adafactor's per-parameter state: factored second moments (``v_row``, ``v_col``)
    for matrices, a full one (``v``) for vectors, unused slots as 1-element zeros."""

    def slots(leaf):
        one = np.zeros(1, np.float32)
        if leaf.ndim >= 2:
            v_row = rng.random(leaf.shape[:-1], dtype=np.float32)
            v_col = rng.random(leaf.shape[:-2] + leaf.shape[-1:], dtype=np.float32)
            return {"m": one, "v": one, "v_col": v_col, "v_row": v_row}
        return {"m": one, "v": rng.random(leaf.shape, dtype=np.float32), "v_col": one, "v_row": one}

    return jax.tree.map(slots, params)


def _write_t5x_orbax(model_dir, params, step, *, ocdbt, dtype):
    """``model_dir/checkpoint_<step>`` as T5X's Orbax checkpoint manager lays it out."""
    tree = {
        "target": jax.tree.map(lambda a: a.astype(DTYPES[dtype]), params),
        "state": {
            "step": np.int32(step),
            "param_states": _adafactor_state(params, np.random.default_rng(step)),
        },
    }
    options = ocp.CheckpointManagerOptions(step_prefix="checkpoint", create=True)
    handlers = {"state": ocp.PyTreeCheckpointHandler(use_ocdbt=ocdbt)}
    with ocp.CheckpointManager(model_dir, options=options, item_handlers=handlers) as manager:
        manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(tree)))
        manager.wait_until_finished()
    step_dir = model_dir / f"checkpoint_{step}"
    (step_dir / "dataset").mkdir()  # T5X's input pipeline state (empty here)
    assert (step_dir / "_CHECKPOINT_METADATA").is_file()
    assert (step_dir / "state" / "_METADATA").is_file()
    assert not (step_dir / "checkpoint").exists()
    assert (step_dir / "state" / "manifest.ocdbt").exists() == ocdbt
    return step_dir


def _record_opens(monkeypatch):
    """The kvstore paths of every TensorStore array the loaders open."""
    opened = []
    original = t5x.ts.open

    def recording(spec, *args, **kwargs):
        opened.append(spec["kvstore"]["path"])
        return original(spec, *args, **kwargs)

    monkeypatch.setattr(t5x.ts, "open", recording)
    return opened


def _tokens(seed, batch=4):
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, CONFIG.vocab_size, (batch, 12)).astype(np.int32)
    dec = rng.integers(2, CONFIG.vocab_size, (batch, 7)).astype(np.int32)
    enc[1, 8:] = 0  # some padding
    return enc, dec


@functools.cache
def _apply():
    return jax.jit(t5.T5(CONFIG).apply)


def _logits(params, enc, dec):
    return np.asarray(_apply()({"params": params}, enc, dec))


def _mesh_logits(partitioner, params, enc, dec):
    """Logits computed on the mesh from placed (sharded) parameters."""

    def forward(p, e, d):
        with partitioner.context():
            return t5.T5(CONFIG).apply({"params": p}, e, d)

    batch = partitioner.shard_batch({"enc": enc, "dec": dec})
    return np.asarray(jax.jit(forward)(params, batch["enc"], batch["dec"]))


@pytest.mark.parametrize(
    "ocdbt, dtype", [(True, "float32"), (False, "bfloat16")], ids=["ocdbt_fp32", "zarr_bf16"]
)
def test_t5x_orbax_loads_like_legacy_t5x(tmp_path, params, monkeypatch, ocdbt, dtype):
    step_dir = _write_t5x_orbax(tmp_path / "orbax", params, STEP, ocdbt=ocdbt, dtype=dtype)
    legacy = save_t5x(tmp_path / "legacy", params, step=STEP, dtype=dtype)
    if not ocdbt:  # the optimizer state's arrays are not needed: without them it loads
        dropped = [p for p in (step_dir / "state").iterdir() if p.name.startswith("state.")]
        assert len(dropped) > 2 * len(flatten(params))
        for path in dropped:
            shutil.rmtree(path)
    opened = _record_opens(monkeypatch)
    legacy_config, legacy_params = load_checkpoint(legacy)
    enc, dec = _tokens(0)
    want = _logits(legacy_params, enc, dec)
    for path in (tmp_path / "orbax", step_dir, step_dir / "state"):
        assert detect_format(path) == "t5x"
        opened.clear()
        config, loaded = load_checkpoint(path)
        assert config == legacy_config == load_config(path)
        assert opened and all(p.strip("/").split("/")[-1].startswith("target.") for p in opened)
        jax.tree.map(np.testing.assert_array_equal, loaded, legacy_params)
        np.testing.assert_array_equal(_logits(loaded, enc, dec), want)
    raw, info = read_t5x(tmp_path / "orbax")
    assert info == {"file": step_dir / "state", "format": "orbax", "version": None, "step": STEP}
    assert flatten(raw)["decoder/layers_1/mlp/wo/kernel"].dtype == DTYPES[dtype]
    if not ocdbt:  # a target array gone: named in one line
        shutil.rmtree(step_dir / "state" / "target.decoder.layers_1.mlp.wo.kernel")
        with pytest.raises(MissingTensorError, match=r"state: tensor 'decoder/layers_1/mlp/wo"):
            load_checkpoint(step_dir)


def _bounds(index, shape):
    """((start, stop) per dimension) of a tuple of slices."""
    return tuple(
        (s.start or 0, n if s.stop is None else s.stop) for s, n in zip(index, shape, strict=True)
    )


def test_t5x_orbax_lazy_reads_each_devices_slice_once(tmp_path, params, monkeypatch):
    _write_t5x_orbax(tmp_path / "orbax", params, STEP, ocdbt=True, dtype="float32")
    legacy = save_t5x(tmp_path / "legacy", params, step=STEP)
    reads: dict[str, list] = {}
    original = t5x._read_slice

    class SlicesOnly:
        """The array, read only through the slice it is indexed with (recorded)."""

        def __init__(self, store):
            self.store = store

        def __getitem__(self, index):
            name = self.store.kvstore.path.strip("/").split("/")[-1]  # ocdbt key or zarr dir
            reads.setdefault(name, []).append(_bounds(index, self.store.shape))
            return self.store[index]

        def read(self):
            raise AssertionError("a whole array was read")

    def recording(store, version, index):
        return original(SlicesOnly(store), version, index)

    monkeypatch.setattr(t5x, "_read_slice", recording)
    partitioner = make_partitioner(data=2, model=4, fsdp=True)
    optimizer = make_optimizer()
    _, lazy = load_checkpoint(tmp_path / "orbax", lazy=True)
    assert all(isinstance(leaf, LazyTensor) for leaf in flatten(lazy).values())
    assert not reads  # loading read no array data
    state = create_train_state(CONFIG, lazy, optimizer, partitioner, jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), params)

    shardings = flatten(train_state_shardings(CONFIG, optimizer, partitioner).params)
    orbax_reads = dict(reads)
    split = 0
    for name, leaf in flatten(params).items():
        sharding = shardings[name]
        devices = sharding.devices_indices_map(leaf.shape).values()
        want = sorted({_bounds(i, leaf.shape) for i in devices})
        assert sorted(orbax_reads.pop("target." + name.replace("/", "."))) == want, name
        split += len(want) > 1
    assert not orbax_reads  # nothing but the target's arrays was read
    assert split >= 10  # most kernels are split over the mesh: no read is whole

    _, legacy_lazy = load_checkpoint(legacy, lazy=True)
    legacy_state = create_train_state(
        CONFIG, legacy_lazy, optimizer, partitioner, jax.random.key(0)
    )
    enc, dec = _tokens(1)
    np.testing.assert_array_equal(
        _mesh_logits(partitioner, state.params, enc, dec),
        _mesh_logits(partitioner, legacy_state.params, enc, dec),
    )


def test_t5x_orbax_convert_and_latest_step(tmp_path, params, capsys):
    model_dir = tmp_path / "orbax"
    _write_t5x_orbax(model_dir, params, 10, ocdbt=True, dtype="float32")
    doubled = jax.tree.map(lambda a: a * 2, params)
    _write_t5x_orbax(model_dir, doubled, 20, ocdbt=True, dtype="float32")
    save_t5x(model_dir, params, step=15)  # a legacy step in the same model dir
    (model_dir / "checkpoint_30.orbax-checkpoint-tmp-1700000000").mkdir()  # unfinished
    assert t5x.all_steps(model_dir) == [10, 15, 20]
    assert convert.main([str(model_dir), str(tmp_path / "hf"), "--to", "hf"]) == 0
    _, from_hf = load_checkpoint(tmp_path / "hf")
    jax.tree.map(np.testing.assert_array_equal, from_hf, doubled)  # the latest step: 20
    assert (
        convert.main([str(model_dir / "checkpoint_10"), str(tmp_path / "t5x"), "--to", "t5x"]) == 0
    )
    _, from_t5x = load_checkpoint(tmp_path / "t5x" / "checkpoint_0")
    jax.tree.map(np.testing.assert_array_equal, from_t5x, params)
    capsys.readouterr()
    (model_dir / "spiece.model").write_bytes(b"")  # found beside the step dir's state item
    assert find_vocabulary(model_dir / "checkpoint_20" / "state") == model_dir / "spiece.model"


def test_gcs_specs_for_ocdbt_and_zarr_items():
    """gs:// items (not reachable here): the specs TensorStore gets for their arrays."""
    item = as_path("gs://bucket/model/checkpoint_5/state")
    zarr = t5x._orbax_array_spec(item, "target.encoder.k", zarr3=True, ocdbt=False)
    assert zarr == {
        "driver": "zarr3",
        "kvstore": {
            "driver": "gcs",
            "bucket": "bucket",
            "path": "model/checkpoint_5/state/target.encoder.k/",
        },
    }
    ocdbt = t5x._orbax_array_spec(item, "target.encoder.k", ocdbt=True)
    assert ocdbt["driver"] == "zarr" and ocdbt["kvstore"]["path"] == "target.encoder.k"
    assert ocdbt["kvstore"]["base"] == {
        "driver": "gcs",
        "bucket": "bucket",
        "path": "model/checkpoint_5/state/",
    }


def test_orbax_dirs_that_are_not_t5x(tmp_path, params):
    # Our own MODEL_DIR checkpoint: Orbax too, but its state holds params, not target.
    with StateCheckpointer(str(tmp_path / "run")) as ckpt:
        state = {"step": np.int32(3), "params": params, "opt_state": {}}
        ckpt.save(3, state, {"model_shape": CONFIG.shape_dict()})
    ours = tmp_path / "run" / "checkpoints" / "3"
    for path in (ours, ours / "state"):
        with pytest.raises(UnknownFormatError) as err:
            load_checkpoint(path)
        message = str(err.value)
        assert "\n" not in message and "an Orbax checkpoint, not an HF or T5X" in message
        assert "no 'target'" in message and "params" in message
        assert "MODEL_DIR" in message and "hir_jax.convert" in message
    # A T5X-named step dir whose state item is not T5X's, in a model dir.
    other = tmp_path / "other"
    with ocp.CheckpointManager(
        other, options=ocp.CheckpointManagerOptions(step_prefix="checkpoint", create=True)
    ) as manager:
        manager.save(4, args=ocp.args.Composite(state=ocp.args.PyTreeSave({"w": np.ones(3)})))
        manager.wait_until_finished()
    for path in (other, other / "checkpoint_4"):
        with pytest.raises(UnknownFormatError, match=r"an Orbax checkpoint.*no 'target'"):
            load_checkpoint(path)
    # An Orbax step dir with no state item at all.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "_CHECKPOINT_METADATA").write_text(json.dumps({"item_handlers": {}}))
    with pytest.raises(UnknownFormatError, match=r"an Orbax checkpoint.*no 'state' item"):
        load_checkpoint(bare)
    with pytest.raises(NoCheckpointError, match=r"a MODEL_DIR of ours .* hir_jax\.convert"):
        load_checkpoint(tmp_path / "run")
    empty = tmp_path / "empty"
    (empty / "checkpoint_7" / "dataset").mkdir(parents=True)
    with pytest.raises(NoCheckpointError):
        load_checkpoint(empty)

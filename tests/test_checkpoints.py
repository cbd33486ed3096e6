"""Checkpoint loaders: HF safetensors (single, sharded, bf16/fp16), export, T5X, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts
from flax import serialization

pytest.importorskip("torch")
pytest.importorskip("transformers")

import hf_reference as ref  # noqa: E402

from hir_jax.checkpoints import (  # noqa: E402
    ConfigError,
    MissingTensorError,
    NoCheckpointError,
    ShapeMismatchError,
    UnexpectedTensorError,
    UnknownFormatError,
    config_from_hf,
    config_from_params,
    config_to_hf,
    detect_format,
    expected_shapes,
    flatten,
    hf_name_map,
    load_checkpoint,
    load_config,
    load_hf,
    load_t5x,
    load_vocabulary,
    read_t5x,
    safetensors_io,
    save_hf,
    save_t5x,
)
from hir_jax.checkpoints.errors import CheckpointError  # noqa: E402
from hir_jax.checkpoints.tree import unflatten  # noqa: E402
from hir_jax.model import t5  # noqa: E402
from hir_jax.model.configs import T5Config, get_config  # noqa: E402


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Two HF checkpoints written by transformers: "v1_1" (untied) and "v1_0" (tied)."""
    out = {}
    for name, kwargs in (("v1_1", ref.V1_1), ("v1_0", ref.V1_0)):
        model = ref.make_hf_model(seed=3, **kwargs)
        out[name] = (model, ref.save_hf_model(model, tmp_path_factory.mktemp(name)))
    return out


def _torch_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def _assert_matches_state(config, params, state) -> None:
    flat = flatten(params)
    for ours, (theirs, transpose) in hf_name_map(config).items():
        want = state[theirs].T if transpose else state[theirs]
        assert flat[ours].dtype == np.float32, ours
        np.testing.assert_array_equal(flat[ours], want, err_msg=ours)


# --------------------------------------------------------------------------- config


def test_config_from_hf_uses_hf_defaults():
    # An old T5 v1.0 config.json: no feed_forward_proj, no tie_word_embeddings.
    cfg = config_from_hf({"model_type": "t5", "d_model": 64, "num_layers": 3, "num_heads": 2})
    assert (cfg.feed_forward_proj, cfg.tie_word_embeddings) == ("relu", True)
    assert (cfg.num_encoder_layers, cfg.num_decoder_layers) == (3, 3)
    assert (cfg.dropout_rate, cfg.relative_attention_max_distance, cfg.d_kv) == (0.1, 128, 64)


def test_config_from_hf_flan_t5_base():
    flan_base = {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
        "d_ff": 2048, "d_kv": 64, "d_model": 768, "decoder_start_token_id": 0,
        "dense_act_fn": "gelu_new", "dropout_rate": 0.1, "eos_token_id": 1,
        "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0,
        "is_encoder_decoder": True, "is_gated_act": True, "layer_norm_epsilon": 1e-06,
        "n_positions": 512, "num_decoder_layers": 12, "num_heads": 12, "num_layers": 12,
        "pad_token_id": 0, "relative_attention_max_distance": 128,
        "relative_attention_num_buckets": 32, "tie_word_embeddings": False,
        "vocab_size": 32128,
    }  # fmt: skip
    cfg = config_from_hf(flan_base)
    assert cfg.shape_dict() == get_config("base").shape_dict()
    assert cfg.dropout_rate == 0.1


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"model_type": "bart", "architectures": ["BartModel"]}, "bart"),
        ({"model_type": "umt5"}, "umt5"),
        ({"feed_forward_proj": "gated-silu"}, "gated-silu"),
        ({"dense_act_fn": "gelu"}, "dense_act_fn"),
        ({"is_gated_act": False}, "is_gated_act"),
        ({"d_model": 0}, "d_model"),
    ],
)
def test_config_from_hf_rejects(change, needle):
    hf = {**config_to_hf(get_config("tiny")), **change}
    with pytest.raises(ConfigError, match=needle) as err:
        config_from_hf(hf, "some/config.json")
    assert "some/config.json" in str(err.value)


@pytest.mark.parametrize("ffp", ["gated-gelu", "relu", "gated-relu", "gelu"])
def test_config_to_hf_round_trip(ffp):
    import transformers

    cfg = get_config("tiny", feed_forward_proj=ffp, tie_word_embeddings=ffp == "relu")
    hf = config_to_hf(cfg)
    assert config_from_hf(hf) == cfg
    hf_cfg = transformers.T5Config(**hf)
    assert hf_cfg.dense_act_fn == {"gated-gelu": "gelu_new"}.get(ffp, ffp.split("-")[-1])
    assert hf_cfg.is_gated_act == cfg.is_gated
    assert hf_cfg.tie_word_embeddings == cfg.tie_word_embeddings


@pytest.mark.parametrize("name", ["v1_1", "v1_0"])
@pytest.mark.parametrize("tie", [False, True])
def test_expected_shapes_match_the_model(name, tie):
    cfg = T5Config(
        vocab_size=50, d_model=16, d_kv=4, d_ff=24, num_heads=3, num_encoder_layers=2,
        num_decoder_layers=3, relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu" if name == "v1_1" else "relu", tie_word_embeddings=tie,
    )  # fmt: skip
    shapes = flatten(t5.param_shapes(cfg))
    assert {k: tuple(v.shape) for k, v in shapes.items()} == expected_shapes(cfg)


# --------------------------------------------------------------------------- HF load


@pytest.mark.parametrize("name", ["v1_1", "v1_0"])
def test_load_hf_maps_every_tensor(hf_dirs, name):
    model, directory = hf_dirs[name]
    config, params = load_hf(directory)
    assert config.tie_word_embeddings == (name == "v1_0")
    assert config.inner_dim == 64 and config.d_ff == 96
    _assert_matches_state(config, params, _torch_state(model))
    assert set(flatten(params)) == set(expected_shapes(config))


def test_load_hf_sharded_index(hf_dirs, tmp_path):
    model, directory = hf_dirs["v1_1"]
    ref.save_hf_model(model, tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    config, params = load_hf(tmp_path)
    _, expected = load_hf(directory)
    assert config == load_hf(directory)[0]
    jax.tree.map(np.testing.assert_array_equal, params, expected)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_load_hf_half_precision(tmp_path, dtype):
    import torch

    model = ref.make_hf_model(seed=4, **ref.V1_1)
    ref.save_hf_model(model, tmp_path, dtype=dtype)
    header, _ = safetensors_io.read_header(tmp_path / "model.safetensors")
    assert {v["dtype"] for v in header.values()} == {"BF16" if dtype == "bfloat16" else "F16"}
    config, params = load_hf(tmp_path)
    half = {k: v.to(getattr(torch, dtype)).float().numpy() for k, v in model.state_dict().items()}
    _assert_matches_state(config, params, half)


def test_load_hf_accepts_pytorch_bin(hf_dirs, tmp_path):
    model, directory = hf_dirs["v1_0"]
    model.save_pretrained(str(tmp_path), safe_serialization=False)
    assert (tmp_path / "pytorch_model.bin").exists()
    config, params = load_hf(tmp_path)
    _assert_matches_state(config, params, _torch_state(model))


def test_load_hf_given_config_must_agree(hf_dirs):
    _, directory = hf_dirs["v1_1"]
    config, _ = load_hf(directory)
    mine = config.replace(dtype="bfloat16", dropout_rate=0.3)
    assert load_hf(directory, mine)[0] is mine
    with pytest.raises(ShapeMismatchError, match=r"config\.json.*d_ff: given 128, file 96"):
        load_hf(directory, config.replace(d_ff=128))


# --------------------------------------------------------------------------- HF export


@pytest.mark.parametrize("name", ["v1_1", "v1_0"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_hf_loads_in_transformers(hf_dirs, tmp_path, name, dtype):
    import torch
    import transformers

    model, directory = hf_dirs[name]
    config, params = load_hf(directory)
    save_hf(tmp_path, config, params, dtype=dtype)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    assert hf_config["model_type"] == "t5" and hf_config["decoder_start_token_id"] == 0
    assert hf_config["tie_word_embeddings"] == (name == "v1_0")
    loaded, info = transformers.T5ForConditionalGeneration.from_pretrained(
        str(tmp_path), output_loading_info=True, dtype=torch.float32
    )
    assert not any(info.values()), info
    want = _torch_state(model)
    if dtype == "bfloat16":
        want = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in want.items()}
    got = _torch_state(loaded)
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_save_hf_shards_and_replaces_old_weights(hf_dirs, tmp_path):
    _, directory = hf_dirs["v1_1"]
    config, params = load_hf(directory)
    save_hf(tmp_path, config, params)
    assert (tmp_path / "model.safetensors").exists()
    save_hf(tmp_path, config, params, max_shard_size="50KB")
    assert not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards == sorted(p.name for p in tmp_path.glob("model-*"))
    assert index["metadata"]["total_size"] == sum(
        np.asarray(v).nbytes for v in flatten(params).values()
    )
    jax.tree.map(np.testing.assert_array_equal, load_hf(tmp_path)[1], params)


# --------------------------------------------------------------------------- T5X


def _random_params(config: T5Config, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    flat = {
        k: rng.standard_normal(shape).astype(np.float32)
        for k, shape in expected_shapes(config).items()
    }
    return unflatten(flat)


TINY = T5Config(
    vocab_size=40, d_model=16, d_kv=4, d_ff=24, num_heads=2, num_encoder_layers=2,
    num_decoder_layers=1, relative_attention_num_buckets=8,
)  # fmt: skip


def _write_t5x_by_hand(ckpt_dir, params, bf16_names=(), inline_names=(), version=3):
    """A checkpoint laid out as T5X's Checkpointer writes it, using TensorStore directly."""
    ckpt_dir.mkdir(parents=True)
    target = {}
    for name, arr in flatten(params).items():
        node = target
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        if name in inline_names:
            node[leaf] = arr
            continue
        dtype = "bfloat16" if name in bf16_names else "float32"
        rel = "target." + name.replace("/", ".")
        chunks = [max(1, arr.shape[0] // 2), *arr.shape[1:]]  # more than one chunk
        metadata = {"compressor": {"id": "gzip"}, "shape": list(arr.shape), "chunks": chunks}
        store = ts.open(
            {
                "driver": "zarr",
                "dtype": dtype,
                "kvstore": {"driver": "file", "path": str(ckpt_dir / rel)},
                "metadata": metadata,
            },
            create=True,
        ).result()
        store.write(arr.astype(ml_dtypes.bfloat16) if dtype == "bfloat16" else arr).result()
        # What T5X stores: ts.Spec(...).to_json() with a relative path (trailing "/").
        node[leaf] = ts.Spec(
            {"driver": "zarr", "dtype": dtype, "kvstore": {"driver": "file", "path": rel}}
            | {"metadata": metadata}
        ).to_json()
    slots = jax.tree.map(lambda a: {"v": np.zeros(a.shape[-1:], np.float32)}, params)
    contents = {
        "version": version,
        "optimizer": {"target": target, "state": {"step": np.int32(7), "param_states": slots}},
    }
    (ckpt_dir / "checkpoint").write_bytes(serialization.msgpack_serialize(contents))


def test_load_t5x_hand_written_checkpoint(tmp_path):
    params = _random_params(TINY)
    bf16 = {"token_embedder/embedding", "encoder/layers_1/mlp/wi_0/kernel"}
    inline = {"decoder/decoder_norm/scale"}
    _write_t5x_by_hand(tmp_path / "model" / "checkpoint_7", params, bf16, inline)
    assert (tmp_path / "model/checkpoint_7/target.encoder.layers_0.attention.query.kernel").is_dir()
    for path in ("model", "model/checkpoint_7", "model/checkpoint_7/checkpoint"):
        loaded = load_t5x(tmp_path / path)
        got, want = flatten(loaded), flatten(params)
        assert set(got) == set(want)
        for key, value in want.items():
            if key in bf16:
                value = value.astype(ml_dtypes.bfloat16).astype(np.float32)
            assert got[key].dtype == np.float32
            np.testing.assert_array_equal(got[key], value, err_msg=key)
    raw, info = read_t5x(tmp_path / "model")
    assert info["step"] == 7 and info["version"] == 3
    assert flatten(raw)["token_embedder/embedding"].dtype == ml_dtypes.bfloat16


def test_load_t5x_reads_gcs_specs_locally_and_version_2_uint16(tmp_path):
    params = _random_params(TINY, seed=1)
    ckpt = tmp_path / "checkpoint_3"
    _write_t5x_by_hand(ckpt, params, version=2)
    # A checkpoint copied down from GCS: specs name the gcs driver and T5X's dummy bucket.
    contents = serialization.msgpack_restore((ckpt / "checkpoint").read_bytes())
    spec = contents["optimizer"]["target"]["encoder"]["encoder_norm"]["scale"]
    # (and the pre-0.1.14 TensorStore layout with the path outside the kvstore).
    spec["kvstore"] = {"driver": "gcs", "bucket": "t5x-dummy-bucket"}
    spec["path"] = "target.encoder.encoder_norm.scale"
    # Version 2 stored bfloat16 as uint16 bit patterns.
    emb = params["token_embedder"]["embedding"].astype(ml_dtypes.bfloat16)
    rel = "target.token_embedder.embedding"
    store = ts.open(
        {"driver": "zarr", "kvstore": {"driver": "file", "path": str(ckpt / rel)}},
        create=True,
        delete_existing=True,
        dtype=ts.uint16,
        shape=emb.shape,
    ).result()
    store.write(emb.view(np.uint16)).result()
    (ckpt / "checkpoint").write_bytes(serialization.msgpack_serialize(contents))
    loaded = flatten(load_t5x(ckpt))
    np.testing.assert_array_equal(
        loaded["encoder/encoder_norm/scale"], params["encoder"]["encoder_norm"]["scale"]
    )
    np.testing.assert_array_equal(loaded["token_embedder/embedding"], emb.astype(np.float32))


@pytest.mark.parametrize("ocdbt", [False, True], ids=["zarr", "ocdbt"])
def test_load_t5x_orbax_placeholders(tmp_path, ocdbt):
    """T5X's Orbax-era layout: "PLACEHOLDER://<name>" leaves; arrays in zarr or OCDBT."""
    ocp = pytest.importorskip("orbax.checkpoint")
    params = _random_params(TINY, seed=5)
    ckpt = tmp_path / "checkpoint_9"
    tree = {"version": 3, "optimizer": {"target": params, "state": {"step": np.int32(9)}}}
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=ocdbt)).save(
        ckpt, args=ocp.args.PyTreeSave(tree)
    )
    names = {k: "optimizer.target." + k.replace("/", ".") for k in flatten(params)}
    placeholders = unflatten({k: "PLACEHOLDER://" + v for k, v in names.items()})
    contents = {"version": 3, "optimizer": {"target": placeholders, "state": {"step": 9}}}
    with pytest.raises(UnknownFormatError, match="an Orbax checkpoint"):
        load_checkpoint(ckpt)
    (ckpt / "checkpoint").write_bytes(serialization.msgpack_serialize(contents))
    jax.tree.map(np.testing.assert_array_equal, load_t5x(ckpt), params)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_t5x_layout_and_round_trip(tmp_path, dtype):
    params = _random_params(TINY, seed=2)
    ckpt = save_t5x(tmp_path, params, step=5, dtype=dtype)
    assert ckpt == tmp_path / "checkpoint_5"
    zarray = json.loads((ckpt / "target.decoder.layers_0.mlp.wo.kernel" / ".zarray").read_text())
    assert zarray["compressor"]["id"] == "gzip" and zarray["shape"] == [24, 16]
    assert zarray["dtype"] == ("bfloat16" if dtype == "bfloat16" else "<f4")
    contents = serialization.msgpack_restore((ckpt / "checkpoint").read_bytes())
    assert contents["version"] == 3 and int(contents["optimizer"]["state"]["step"]) == 5
    spec = contents["optimizer"]["target"]["encoder"]["layers_1"]["attention"]["out"]["kernel"]
    assert spec["kvstore"] == {
        "driver": "file",
        "path": "target.encoder.layers_1.attention.out.kernel",
    }
    got = flatten(load_t5x(tmp_path))
    for key, value in flatten(params).items():
        if dtype == "bfloat16":
            value = value.astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    with pytest.raises(CheckpointError, match="already exists"):
        save_t5x(tmp_path, params, step=5)


def test_load_checkpoint_detects_formats_and_infers_t5x_config(hf_dirs, tmp_path):
    _, directory = hf_dirs["v1_0"]
    assert detect_format(directory) == "hf"
    assert detect_format(directory / "model.safetensors") == "hf"
    config, params = load_checkpoint(directory)
    save_t5x(tmp_path / "t5x", params, step=10)
    save_t5x(tmp_path / "t5x", jax.tree.map(lambda a: a * 2, params), step=200)
    (tmp_path / "t5x" / "checkpoint_300.tmp-1234").mkdir()  # an unfinished save
    for path in ("t5x", "t5x/checkpoint_200", "t5x/checkpoint_200/checkpoint"):
        assert detect_format(tmp_path / path) == "t5x"
    t5x_config, t5x_params = load_checkpoint(tmp_path / "t5x")  # latest: step 200
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, 2 * b), t5x_params, params)
    assert t5x_config.shape_dict() == config.shape_dict()
    given = config.replace(dropout_rate=0.0)
    assert load_checkpoint(tmp_path / "t5x/checkpoint_10", given)[0] is given
    assert config_from_params(params, base=config) == config


def test_load_config_reads_no_weights(hf_dirs, tmp_path):
    _, hf_dir = hf_dirs["v1_0"]
    config, params = load_checkpoint(hf_dir)
    ckpt = save_t5x(tmp_path / "t5x", params, step=1)
    shutil.copytree(hf_dir, tmp_path / "hf")
    # Garble every weight file: only configs and array metadata stay readable.
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"not weights")
    chunks = [
        p for p in Path(ckpt).rglob("*") if p.is_file() and p.name not in (".zarray", "checkpoint")
    ]
    assert chunks
    for chunk in chunks:
        chunk.write_bytes(b"not a chunk")
    assert load_config(tmp_path / "hf") == config
    assert load_config(tmp_path / "t5x").shape_dict() == config.shape_dict()
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "hf")
    with pytest.raises(Exception):  # noqa: B017 - tensorstore's own decode error
        load_checkpoint(tmp_path / "t5x")
    with pytest.raises(ShapeMismatchError, match="d_ff"):
        load_config(tmp_path / "t5x", config.replace(d_ff=config.d_ff * 2))


def test_t5x_config_inference_v1_1():
    params = _random_params(TINY)
    assert config_from_params(params).shape_dict() == TINY.shape_dict()


# --------------------------------------------------------------------------- bad input


def _copy_hf(directory, tmp_path):
    out = tmp_path / "copy"
    out.mkdir()
    for f in directory.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def test_missing_tensor_hf(hf_dirs, tmp_path):
    d = _copy_hf(hf_dirs["v1_1"][1], tmp_path)
    gone = "decoder.block.1.layer.1.EncDecAttention.v.weight"
    tensors = safetensors_io.read_tensors(d / "model.safetensors")
    del tensors[gone]
    safetensors_io.write_tensors(d / "model.safetensors", tensors, {"format": "pt"})
    with pytest.raises(MissingTensorError, match=rf"model\.safetensors: missing tensor '{gone}'"):
        load_checkpoint(d)


def test_missing_shard_hf(hf_dirs, tmp_path):
    ref.save_hf_model(hf_dirs["v1_1"][0], tmp_path, max_shard_size="60KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(MissingTensorError, match=rf"index\.json: shard {shard.name}"):
        load_checkpoint(tmp_path)


def test_shape_mismatch_hf(hf_dirs, tmp_path):
    d = _copy_hf(hf_dirs["v1_1"][1], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["d_ff"] = 128
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ShapeMismatchError,
        match=r"model\.safetensors: tensor 'encoder\.block\.0\.layer\.1\.DenseReluDense\.wi_0"
        r"\.weight' has shape \(96, 64\).*needs \(128, 64\)",
    ):
        load_checkpoint(d)


def test_unexpected_tensor_hf(hf_dirs, tmp_path):
    d = _copy_hf(hf_dirs["v1_1"][1], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_layers"] = 1  # the file has two encoder blocks
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnexpectedTensorError, match=r"tensor 'encoder\.block\.1\."):
        load_checkpoint(d)


def test_non_t5_model_type(hf_dirs, tmp_path):
    d = _copy_hf(hf_dirs["v1_1"][1], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "bart"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json: model_type 'bart'"):
        load_checkpoint(d)


def test_missing_and_mismatched_tensor_t5x(tmp_path):
    params = _random_params(TINY)
    ckpt = save_t5x(tmp_path, params, step=1)
    with pytest.raises(
        ShapeMismatchError,
        match=r"checkpoint: tensor 'encoder/layers_0/mlp/wi_0/kernel' has shape \(16, 24\)",
    ):
        load_checkpoint(tmp_path, TINY.replace(d_ff=32))
    shutil.rmtree(ckpt / "target.decoder.logits_dense.kernel")
    with pytest.raises(
        MissingTensorError, match="checkpoint: tensor 'decoder/logits_dense/kernel'"
    ):
        load_checkpoint(tmp_path)


def test_t5x_head_but_tied_config(tmp_path):
    save_t5x(tmp_path, _random_params(TINY), step=1)
    with pytest.raises(UnexpectedTensorError, match="logits_dense.*untied output head"):
        load_checkpoint(tmp_path, TINY.replace(tie_word_embeddings=True))


def test_unknown_formats(tmp_path):
    odd = tmp_path / "weights.h5"
    odd.write_bytes(b"\x89HDF\r\n")
    with pytest.raises(UnknownFormatError, match=r"weights\.h5: unknown checkpoint format"):
        load_checkpoint(odd)
    tf_dir = tmp_path / "mesh_tf"
    tf_dir.mkdir()
    (tf_dir / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-1000000"\n')
    with pytest.raises(UnknownFormatError, match="TensorFlow"):
        load_checkpoint(tf_dir)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes(b"")
    with pytest.raises(UnknownFormatError, match="no config.json"):
        load_checkpoint(bare)
    junk = tmp_path / "junk" / "checkpoint_1"
    junk.mkdir(parents=True)
    (junk / "checkpoint").write_bytes(b"\xc1 not msgpack")
    with pytest.raises(UnknownFormatError, match="junk/checkpoint_1/checkpoint"):
        load_checkpoint(junk.parent)
    flax_only = tmp_path / "flax_only"
    flax_only.mkdir()
    (flax_only / "config.json").write_text(json.dumps(config_to_hf(TINY)))
    (flax_only / "flax_model.msgpack").write_bytes(b"")
    with pytest.raises(UnknownFormatError, match="flax_model.msgpack"):
        load_checkpoint(flax_only)


def test_no_checkpoint(tmp_path):
    with pytest.raises(NoCheckpointError, match="does-not-exist: no such file"):
        load_checkpoint(tmp_path / "does-not-exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "checkpoint_5.tmp-99").mkdir()
    with pytest.raises(NoCheckpointError, match=r"empty: no checkpoint found; looked for"):
        load_checkpoint(empty)
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    (config_only / "config.json").write_text(json.dumps(config_to_hf(TINY)))
    with pytest.raises(NoCheckpointError, match=r"config_only: has config\.json but no weights"):
        load_checkpoint(config_only)
    assert issubclass(NoCheckpointError, FileNotFoundError)


# --------------------------------------------------------------------------- vocabulary


@pytest.fixture(scope="module")
def spiece_model(tmp_path_factory):
    import io

    import sentencepiece as spm

    lines = [
        "Solve the question with correct answer.",
        "Q: How many apples are there? A: three",
        "The quick brown fox jumps over the lazy dog.",
    ] * 20
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=40, pad_id=0, eos_id=1,
        unk_id=2, bos_id=-1, model_type="unigram", minloglevel=2,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("vocab") / "spiece.model"
    path.write_bytes(buf.getvalue())
    return path


def test_load_vocabulary_beside_checkpoints(spiece_model, tmp_path):
    hf_dir = tmp_path / "hf"
    save_hf(hf_dir, TINY, _random_params(TINY), vocabulary=spiece_model)
    vocab = load_vocabulary(hf_dir)
    assert vocab.vocab_size == 40 + 100  # T5's 100 sentinel ids are added
    ids = vocab.encode("Solve the question")
    assert vocab.decode(ids) == "Solve the question"
    assert (vocab.pad_id, vocab.eos_id) == (0, 1)
    # A T5X model dir: the vocabulary sits above checkpoint_<step>.
    ckpt = save_t5x(tmp_path / "t5x", _random_params(TINY), step=1)
    (tmp_path / "t5x" / "sentencepiece.model").write_bytes(spiece_model.read_bytes())
    assert load_vocabulary(ckpt).vocab_size == 140
    assert load_vocabulary(spiece_model, extra_ids=0).vocab_size == 40
    with pytest.raises(NoCheckpointError, match="no SentencePiece vocabulary; looked for"):
        load_vocabulary(tmp_path / "nowhere")

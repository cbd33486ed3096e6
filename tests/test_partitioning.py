"""Mesh construction, logical axis rules, and sharding helpers on 8 simulated CPU devices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hir_jax import partitioning as part
from hir_jax.model import t5
from hir_jax.model.configs import get_config

TINY = get_config("tiny")


def _specs(shardings):
    return jax.tree.map(
        lambda s: tuple(s.spec), shardings, is_leaf=lambda x: isinstance(x, NamedSharding)
    )


@pytest.mark.parametrize(
    "data, model, expected",
    [(-1, 1, (8, 1)), (4, 2, (4, 2)), (-1, 2, (4, 2)), (2, -1, (2, 4)), (8, 1, (8, 1))],
)
def test_create_mesh_shapes(data, model, expected):
    mesh = part.create_mesh(data, model)
    assert mesh.axis_names == ("data", "model")
    assert tuple(mesh.shape.values()) == expected
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_create_mesh_single_device():
    mesh = part.create_mesh(1, 1, devices=jax.devices()[:1])
    assert dict(mesh.shape) == {"data": 1, "model": 1}
    assert part.create_mesh(-1, 1, devices=jax.devices()[:1]).devices.size == 1


@pytest.mark.parametrize(
    "data, model, pattern",
    [
        (3, 2, r"data=3 x model=2 = 6 devices, but 8"),
        (-1, 3, r"data=-1, model=3.*3 does not divide the 8"),
        (3, -1, r"data=3, model=-1.*3 does not divide the 8"),
        (-1, -1, r"at most one"),
        (0, 1, r"'data' size must be positive"),
    ],
)
def test_create_mesh_errors_name_both_sizes(data, model, pattern):
    with pytest.raises(part.PartitioningError, match=pattern):
        part.create_mesh(data, model)


def test_rules_map_parameters_to_expected_mesh_axes():
    specs = _specs(part.make_partitioner(4, 2).param_shardings(TINY))
    enc, dec = specs["encoder"], specs["decoder"]
    assert specs["token_embedder"]["embedding"] == ("model", None)
    for name in ("query", "key", "value"):
        assert enc["layers_0"]["attention"][name]["kernel"] == (None, "model")
        assert dec["layers_1"]["encoder_decoder_attention"][name]["kernel"] == (None, "model")
    assert enc["layers_0"]["attention"]["out"]["kernel"] == ("model", None)
    assert enc["layers_1"]["mlp"]["wi_0"]["kernel"] == (None, "model")
    assert enc["layers_1"]["mlp"]["wi_1"]["kernel"] == (None, "model")
    assert enc["layers_1"]["mlp"]["wo"]["kernel"] == ("model", None)
    assert enc["relpos_bias"]["rel_embedding"] == ("model", None)
    assert enc["encoder_norm"]["scale"] == (None,)
    assert dec["layers_0"]["pre_cross_attention_layer_norm"]["scale"] == (None,)
    assert dec["logits_dense"]["kernel"] == (None, "model")


def test_fsdp_shards_embed_over_data_for_params_only():
    p = part.make_partitioner(4, 2, fsdp=True)
    specs = _specs(p.param_shardings(TINY))
    assert specs["token_embedder"]["embedding"] == ("model", "data")
    assert specs["encoder"]["layers_0"]["mlp"]["wo"]["kernel"] == ("model", "data")
    assert specs["decoder"]["logits_dense"]["kernel"] == ("data", "model")
    assert specs["decoder"]["decoder_norm"]["scale"] == ("data",)
    # Activations: batch takes "data" first, so embed stays replicated.
    assert part.logical_to_mesh_spec(("batch", "length", "embed"), p.rules) == P("data", None, None)
    assert part.logical_to_mesh_spec(("batch", "length", "mlp"), p.rules) == P(
        "data", None, "model"
    )


def test_non_dividing_dimension_names_parameter_axes_and_mesh():
    with pytest.raises(part.PartitioningError) as info:
        part.make_partitioner(1, 8).param_shardings(TINY)  # 4 heads over 8 devices
    msg = str(info.value)
    assert "relpos_bias/rel_embedding" in msg
    assert "('heads', 'relpos_buckets')" in msg
    assert "'model' of size 8" in msg and "{'data': 1, 'model': 8}" in msg


def test_unknown_logical_axis_is_an_error():
    with pytest.raises(part.PartitioningError, match="no rule for \\['layers'\\]"):
        part.logical_to_mesh_spec(("layers", "embed"), part.logical_axis_rules())


def test_shard_params_places_each_parameter():
    p = part.make_partitioner(4, 2)
    params = jax.jit(lambda r: t5.init_params(TINY, r))(jax.random.key(0))
    sharded = p.shard_params(params, TINY)
    emb = sharded["token_embedder"]["embedding"]
    assert emb.sharding.spec == P("model", None)
    assert {s.data.shape for s in emb.addressable_shards} == {(TINY.vocab_size // 2, 64)}
    np.testing.assert_array_equal(
        np.asarray(emb), np.asarray(params["token_embedder"]["embedding"])
    )


def test_opt_state_shardings_mirror_params_and_replicate_scalars():
    p = part.make_partitioner(4, 2)
    sh = p.opt_state_shardings(optax.adamw(1e-3), TINY)
    params_specs = _specs(p.param_shardings(TINY))
    adam = sh[0]
    assert _specs(adam.mu) == params_specs and _specs(adam.nu) == params_specs
    assert tuple(adam.count.spec) == ()


def test_opt_state_shardings_of_factored_adafactor_drop_the_reduced_axis():
    mesh = part.create_mesh(4, 2)
    params = {"w": jax.ShapeDtypeStruct((256, 128), jnp.float32)}
    params_sh = {"w": NamedSharding(mesh, P("data", "model"))}
    sh = part.opt_state_shardings(optax.adafactor(1e-3), params, params_sh, mesh)
    state = jax.eval_shape(optax.adafactor(1e-3).init, params)
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    flat_sh = jax.tree.leaves(sh, is_leaf=lambda x: isinstance(x, NamedSharding))
    got = {
        jax.tree_util.keystr(path): (leaf.shape, tuple(s.spec))
        for (path, leaf), s in zip(flat, flat_sh, strict=True)
    }
    assert got["[0].v_row['w']"] == ((128,), ("model",))
    assert got["[0].v_col['w']"] == ((256,), ("data",))
    assert got["[0].v['w']"][1] == ()


def test_shard_batch_splits_leading_dim_over_data():
    p = part.make_partitioner(4, 2)
    batch = {"x": np.arange(8 * 3).reshape(8, 3), "y": np.arange(8)}
    out = p.shard_batch(batch)
    assert out["x"].sharding.spec == P("data")
    assert {s.data.shape for s in out["x"].addressable_shards} == {(2, 3)}
    np.testing.assert_array_equal(np.asarray(out["x"]), batch["x"])
    with pytest.raises(
        part.PartitioningError, match=r"batch\['z'\].*6 is not divisible.*'data' of size 4"
    ):
        p.shard_batch({"z": np.zeros((6, 2))})


def test_logical_context_resolves_model_constraints_inside_jit():
    p = part.make_partitioner(4, 2)

    def f(x):
        with p.context():
            return nn.with_logical_constraint(x * 2, ("batch", "mlp"))

    text = jax.jit(f).lower(jnp.ones((8, 4))).as_text()
    assert "sharding_constraint" in text and '[{"data"}, {"model"}]' in text
    # Outside any context the model's constraints are no-ops.
    plain = jax.jit(lambda x: nn.with_logical_constraint(x * 2, ("batch", "mlp")))
    assert "sharding_constraint" not in plain.lower(jnp.ones((8, 4))).as_text()

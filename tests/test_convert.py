"""Checkpoint conversion: our MODEL_DIR -> HF -> T5X keeps every parameter."""

import jax
import numpy as np
import pytest

from hir_jax import convert
from hir_jax.checkpoints import load_hf, load_t5x
from hir_jax.checkpoints.state import StateCheckpointer
from hir_jax.model.configs import get_config
from hir_jax.model.t5 import init_params


def _assert_same(a, b):
    flat_a = dict(jax.tree_util.tree_flatten_with_path(a)[0])
    flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k]), err_msg=str(k))


def test_model_dir_to_hf_to_t5x_round_trip(tmp_path):
    config = get_config("tiny", vocab_size=96)
    params = init_params(config, jax.random.key(0))
    ckpt = StateCheckpointer(str(tmp_path / "run"))
    state = {"step": np.int32(7), "params": params, "opt_state": {}, "rng": np.zeros(2, np.uint32)}
    ckpt.save(3, state, {"model_shape": config.shape_dict()})
    ckpt.close()
    assert convert.is_model_dir(str(tmp_path / "run"))

    assert convert.main([str(tmp_path / "run"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    hf_config, hf_params = load_hf(tmp_path / "hf")
    assert hf_config.shape_dict() == config.shape_dict()
    _assert_same(hf_params, params)

    assert convert.main([str(tmp_path / "hf"), str(tmp_path / "t5x"), "--to", "t5x"]) == 0
    _assert_same(load_t5x(tmp_path / "t5x" / "checkpoint_0"), params)


def test_bad_source_is_one_line_error(tmp_path, capsys):
    assert convert.main([str(tmp_path), str(tmp_path / "out"), "--to", "hf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path) in err[0]
    with pytest.raises(SystemExit):
        convert.main([str(tmp_path), str(tmp_path / "out"), "--to", "onnx"])

"""Runs that survive damage and refuse bad settings: a damaged newest checkpoint is
reported and skipped for the intact one before it (and kept), a diverged run stops with
exit 3 and no non-finite checkpoint, settings out of range and an unwritable MODEL_DIR
fail in one line before any work."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from run_py_helpers import main_in_process, metric_lines

from hir_jax import data as data_lib
from hir_jax import runner
from hir_jax.checkpoints import save_hf
from hir_jax.checkpoints.state import (
    DAMAGED_DIR,
    FILES_NAME,
    DamagedCheckpointError,
    StateCheckpointer,
    checkpoint_id,
)
from hir_jax.epochs import Diverged, check_finite, check_step
from hir_jax.loop import LoopConfig
from hir_jax.methods import SFT, ZeroShot
from hir_jax.model.configs import get_config
from hir_jax.model.t5 import init_params
from hir_jax.partitioning import make_partitioner
from hir_jax.settings import SettingError
from hir_jax.train import make_optimizer
from tasks import vocab as vocab_lib


@pytest.fixture(scope="module")
def vocab(bigbench_dir):
    return vocab_lib.get_vocabulary(vocab_size=1024)


def _sft(model_dir, vocab, learning_rate=1e-3, **loop_kw):
    """A short SFT run of the tiny model on one device (checkpoints at every round's end)."""
    loop = dict(
        num_rounds=2, epochs=1, batch_size=16, max_train_examples=32, max_test_examples=8,
        eval_max_new_tokens=4, max_new_tokens=4, keep_checkpoints=3,
    )  # fmt: skip
    spec = runner.setup(
        method=SFT(),
        model_config=get_config("tiny", vocab_size=vocab.vocab_size),
        vocabulary=lambda: vocab,
        loop=LoopConfig(**{**loop, **loop_kw}),
        optimizer=make_optimizer(learning_rate=learning_rate),
        partitioner=make_partitioner(data=1, devices=jax.devices()[:1]),
    )
    return runner.run(model_dir=str(model_dir), task="pet_rule", spec=spec)


def _ids(model_dir):
    return sorted(int(p.name) for p in (model_dir / "checkpoints").iterdir() if p.name.isdigit())


def _empty_largest_file(step_dir):
    files = sorted((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=_size)
    files[-1].write_bytes(b"")
    return files[-1]


def _size(path):
    return path.stat().st_size


# --------------------------------------------------------------------------- damage


def test_a_damaged_newest_checkpoint_is_reported_kept_and_skipped(
    tmp_path, bigbench_dir, vocab, capsys
):
    _sft(tmp_path / "full", vocab)
    run_dir = tmp_path / "run"
    _sft(run_dir, vocab)
    newest = checkpoint_id(3)
    assert _ids(run_dir) == [checkpoint_id(1), checkpoint_id(2), newest]
    emptied = _empty_largest_file(run_dir / "checkpoints" / str(newest))
    capsys.readouterr()

    _sft(run_dir, vocab)  # resumes from round 2's start and redoes round 2

    out = capsys.readouterr().out
    damage = [line for line in out.splitlines() if "is damaged" in line]
    rel = emptied.relative_to(run_dir / "checkpoints" / str(newest)).as_posix()
    assert damage == [
        f"checkpoint {newest} (round 3, step 0) in {run_dir}/checkpoints is damaged: "
        f"{rel} is 0 bytes, {_expected_size(run_dir, newest, rel)} when written; "
        "trying the one before it"
    ]
    assert f"resumed from {run_dir}/checkpoints/{checkpoint_id(2)}" in out
    kept = run_dir / DAMAGED_DIR / str(newest)
    assert (kept / rel).exists() and _size(kept / rel) == 0  # moved aside, never deleted
    assert metric_lines(run_dir) == metric_lines(tmp_path / "full")
    assert _ids(run_dir)[-1] == newest  # written again, intact


def _expected_size(run_dir, ckpt_id, rel):
    import json

    return json.loads((run_dir / DAMAGED_DIR / str(ckpt_id) / FILES_NAME).read_text())[rel]


# A checkpoint without its file list is caught by reading it: orbax's reads still in
# flight then fail too, and their coroutines are collected with the error.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_with_no_intact_checkpoint_the_run_stops_naming_model_dir(
    tmp_path, bigbench_dir, vocab, capsys
):
    run_dir = tmp_path / "run"
    _sft(run_dir, vocab, num_rounds=1)
    first, second = _ids(run_dir)
    _empty_largest_file(run_dir / "checkpoints" / str(second))  # caught by its file list
    legacy = run_dir / "checkpoints" / str(first)  # no file list: caught when read
    (legacy / FILES_NAME).unlink()
    _empty_largest_file(legacy)
    capsys.readouterr()

    with pytest.raises(DamagedCheckpointError) as err:
        _sft(run_dir, vocab, num_rounds=1)
    message = str(err.value)
    assert f"MODEL_DIR {run_dir} has no intact checkpoint (damaged: {second}, {first})" in message
    assert "start afresh in another MODEL_DIR" in message
    out = capsys.readouterr().out
    assert out.count("is damaged") == 2 and f"checkpoint {first} (round 1" in out
    assert _ids(run_dir) == [first, second]  # nothing moved or deleted
    assert not (run_dir / DAMAGED_DIR).exists()


# --------------------------------------------------------------------------- divergence


def test_check_step_stops_on_non_finite_values_and_on_a_dead_supervised_gradient():
    where = "at round 2, step 5 of the round"
    for metrics in ({"loss": np.nan, "grad_norm": 1.0}, {"loss": 1.0, "grad_norm": np.inf}):
        with pytest.raises(Diverged, match=r"= (nan|inf) at round 2, step 5 of the round"):
            check_step(metrics, where, supervised=False)
    with pytest.raises(Diverged, match="grad_norm = 0 with loss 6.931 .* dead network"):
        check_step({"loss": math.log(1024), "grad_norm": 0.0}, where, supervised=True)
    check_step({"loss": 0.7, "grad_norm": 0.0}, where, supervised=False)  # RL: zero advantages
    check_step({"loss": 0.0, "grad_norm": 0.0}, where, supervised=True)  # a perfect fit
    check_step({"loss": 0.7, "grad_norm": 2.0}, where, supervised=True)


def test_check_finite_looks_at_every_floating_leaf():
    tree = {"w": np.ones((3, 2), np.float32), "step": np.int32(4), "rng": jax.random.key(0)}
    check_finite(tree, "here")
    tree["w"][1, 1] = np.nan
    with pytest.raises(Diverged, match="non-finite parameters or optimizer state here"):
        check_finite(tree, "here")


def test_a_diverging_run_exits_3_and_keeps_its_last_finite_checkpoint(
    tmp_path, bigbench_dir, vocab, capsys, clean_gin
):
    # A far too high learning rate kills the tiny network in its first steps (its loss
    # goes to ln(vocab) with a zero gradient); run.py reports it and exits 3.
    run_dir = tmp_path / "run"
    args = [
        "--gin_file=runs/sft.gin", "--gin_file=models/flan_t5_tiny.gin",
        f"--gin.MODEL_DIR='{run_dir}'", "--gin.TASK='pet_rule'",
        "--gin.hir_jax.train.make_optimizer.learning_rate=1e4",
        "--gin.hir_jax.loop.LoopConfig.num_rounds=2", "--gin.hir_jax.loop.LoopConfig.epochs=2",
        "--gin.hir_jax.loop.LoopConfig.batch_size=8",
        "--gin.hir_jax.loop.LoopConfig.max_train_examples=32",
        "--gin.hir_jax.loop.LoopConfig.max_test_examples=8",
        "--gin.hir_jax.loop.LoopConfig.eval_max_new_tokens=4",
        "--gin.hir_jax.loop.LoopConfig.checkpoint_every_steps=1",
    ]  # fmt: skip
    code, err = main_in_process(args, capsys)
    assert code == 3, err
    assert len(err) == 1 and err[0].startswith("error: training diverged: "), err
    assert "at round 1, step" in err[0]
    step = int(err[0].split("at round 1, step ")[1].split()[0])
    ids = _ids(run_dir)
    # Checkpoints every step: the last one is the step before the one that diverged.
    assert ids[-1] == checkpoint_id(1, step - 1), (ids, step)
    with StateCheckpointer(str(run_dir)) as ckpt:
        state = ckpt.restore_state(ids[-1], None)
    check_finite(state, "in the latest checkpoint")


def test_non_finite_parameters_are_never_saved(tmp_path, bigbench_dir, vocab):
    config = get_config("tiny", vocab_size=vocab.vocab_size)
    params = jax.tree.map(np.array, init_params(config, jax.random.key(0)))
    params["decoder"]["decoder_norm"]["scale"][0] = np.nan
    save_hf(tmp_path / "nan", config, params)
    spec = runner.setup(
        method=ZeroShot(),
        initial_checkpoint=str(tmp_path / "nan"),
        vocabulary=lambda: vocab,
        loop=LoopConfig(max_test_examples=8, eval_max_new_tokens=3),
        partitioner=make_partitioner(data=1, devices=jax.devices()[:1]),
    )
    with pytest.raises(Diverged, match="before the checkpoint of round 1, step 0; not saved"):
        runner.run(model_dir=str(tmp_path / "run"), task="pet_rule", spec=spec)
    assert _ids(tmp_path / "run") == []


# --------------------------------------------------------------------------- settings

BAD_SETTINGS = [
    ("hir_jax.loop.LoopConfig.num_rounds=-1", "= -1: must be an integer >= 0"),
    ("hir_jax.loop.LoopConfig.batch_size=0", "= 0: must be an integer >= 1"),
    ("hir_jax.loop.LoopConfig.epochs=0", "= 0: must be an integer >= 1"),
    ("hir_jax.loop.LoopConfig.samples_per_query=0", "= 0: must be an integer >= 1"),
    ("hir_jax.loop.LoopConfig.num_microbatches=0", "= 0: must be an integer >= 1"),
    ("hir_jax.loop.LoopConfig.max_new_tokens=0", "= 0: must be an integer >= 1"),
    ("hir_jax.loop.LoopConfig.eval_batch_size=-2", "= -2: must be an integer >= 1"),
    ("hir_jax.loop.LoopConfig.temperature=-0.5", "= -0.5: must be a number >= 0"),
    ("hir_jax.loop.LoopConfig.top_p=0.0", "= 0.0: must be in (0, 1]"),
    ("hir_jax.loop.LoopConfig.top_p=1.5", "= 1.5: must be in (0, 1]"),
    ("hir_jax.loop.LoopConfig.buffer_cap_factor=0.0", "= 0.0: must be a number > 0"),
    ("hir_jax.loop.LoopConfig.keep_checkpoints=0", "= 0: must be an integer >= 1"),
    ("hir_jax.loop.LoopConfig.max_train_examples=0", "= 0: must be an integer >= 1, or None"),
    ("hir_jax.train.LossConfig.label_smoothing=1.0", "= 1.0: must be in [0, 1)"),
    ("hir_jax.train.LossConfig.beta=-0.1", "= -0.1: must be a number >= 0"),
    ("hir_jax.train.make_optimizer.learning_rate=-1e-3", "= -0.001: must be a number >= 0"),
    ("hir_jax.methods.HIR.holdout_fraction=1.0", "= 1.0: must be in [0, 1)"),
    ("hir_jax.model.model_config.dropout_rate=1.5", "= 1.5: must be in [0, 1), or None"),
    # 8 simulated devices (conftest): 12 rows do not split over the data axis.
    ("hir_jax.loop.LoopConfig.batch_size=12", "= 12: must be a multiple of num_microbatches"),
]


@pytest.mark.parametrize(("binding", "message"), BAD_SETTINGS)
def test_a_setting_out_of_range_fails_in_one_line_before_any_work(
    binding, message, tmp_path, bigbench_dir, capsys, monkeypatch, clean_gin
):
    def no_task_read(*args, **kwargs):
        raise AssertionError("the task was read")

    monkeypatch.setattr(data_lib, "load", no_task_read)
    args = [
        "--gin_file=runs/hir.gin", "--gin_file=models/flan_t5_tiny.gin",
        f"--gin.MODEL_DIR='{tmp_path / 'run'}'", "--gin.TASK='pet_rule'", f"--gin.{binding}",
    ]  # fmt: skip
    code, err = main_in_process(args, capsys)
    name = binding.split("=")[0]
    assert code == 2 and len(err) == 1, err
    assert f"SettingError: {name} {message}" in err[0], err


def test_zero_is_allowed_where_it_means_off():
    cfg = LoopConfig(num_rounds=0, top_k=0, warmup_epochs=0, checkpoint_every_steps=0)
    assert cfg.num_rounds == 0
    assert LoopConfig(temperature=0.0).sampling().greedy  # temperature 0: greedy
    with pytest.raises(SettingError, match="LoopConfig.dedup = 'all': must be one of"):
        LoopConfig(dedup="all")


def test_an_unwritable_model_dir_fails_first_naming_it(
    tmp_path, bigbench_dir, capsys, monkeypatch, clean_gin
):
    def no_setup(*args, **kwargs):
        raise AssertionError("set-up ran before MODEL_DIR was checked")

    monkeypatch.setattr(runner, "setup", no_setup)
    (tmp_path / "a_file").write_text("")
    model_dir = tmp_path / "a_file" / "run"
    args = [
        "--gin_file=runs/hir.gin", "--gin_file=models/flan_t5_tiny.gin",
        f"--gin.MODEL_DIR='{model_dir}'", "--gin.TASK='pet_rule'",
    ]  # fmt: skip
    code, err = main_in_process(args, capsys)
    assert code == 2 and len(err) == 1, err
    assert f"MODEL_DIR {model_dir} cannot be created or written: Not a directory" in err[0]

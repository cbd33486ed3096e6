"""The HIR loop end to end: it learns where no-hindsight does not, it resumes exactly after
SIGTERM or SIGKILL, and run.py fails with one-line messages on bad input."""

from __future__ import annotations

import json
import signal
import time

import gin
import jax
import numpy as np
import pytest
from run_py_helpers import (
    REPO,
    TIMING,
    main_in_process,
    metric_lines,
    quick_args,
    run_py,
    wait_for_test_line,
)

from hir_jax import metrics_log, runner
from hir_jax.checkpoints.state import ROUND_STRIDE, checkpoint_id
from hir_jax.loop import LoopConfig
from hir_jax.methods import HIR, ZeroShot
from hir_jax.model.configs import get_config
from hir_jax.partitioning import make_partitioner
from hir_jax.preemption import Preempted, Preemption
from hir_jax.train import LossConfig, make_optimizer
from tasks import vocab as vocab_lib

CHANCE = 1 / 3


@pytest.fixture(scope="module")
def vocab(bigbench_dir):
    return vocab_lib.get_vocabulary(vocab_size=1024)


def _one_device():
    return make_partitioner(data=1, devices=jax.devices()[:1])


def _run_hir(model_dir, task="pet_rule", **setup_kw):
    """``runner.run`` of the tiny model on one device (``setup_kw``: ``runner.setup``'s)."""
    setup_kw.setdefault("method", HIR())
    setup_kw.setdefault("partitioner", _one_device())
    return runner.run(model_dir=str(model_dir), task=task, spec=runner.setup(**setup_kw))


def _run(model_dir, vocab, method):
    loop = LoopConfig(
        num_rounds=4,
        samples_per_query=4,
        max_new_tokens=5,
        eval_max_new_tokens=5,
        epochs=4,
        batch_size=32,
        sample_batch_size=128,
        eval_batch_size=32,
        warmup_task="hat_guess",
        warmup_epochs=6,
    )
    _run_hir(
        model_dir,
        method=method,
        model_name="flan_t5_tiny",
        model_config=get_config("tiny", vocab_size=vocab.vocab_size),
        vocabulary=lambda: vocab,
        loop=loop,
        optimizer=make_optimizer(learning_rate=1e-3),
        loss=LossConfig(),
    )
    return [r["accuracy"] for r in metrics_log.read_metrics(model_dir) if r["split"] == "test"]


def test_hir_learns_a_rule_that_no_hindsight_does_not(tmp_path, vocab):
    # Warm-up on hat_guess teaches the answer format only: round 0 is about chance.
    # relabel_instruction="paper": the positive instruction of a correct output is the
    # sampling instruction itself (the released code drops "the" there; see the note).
    with_hindsight = _run(
        tmp_path / "hir", vocab, HIR(relabel_instruction="paper", sub_output=False)
    )
    without = _run(
        tmp_path / "none",
        vocab,
        HIR(relabel_instruction="paper", sub_output=False, hindsight=False),
    )
    assert abs(with_hindsight[0] - CHANCE) < 0.15, with_hindsight
    assert with_hindsight[-1] >= 2 * CHANCE, with_hindsight
    assert max(without) <= 0.5, without
    assert without[0] == with_hindsight[0]  # same warm-up, same start


# --------------------------------------------------------------------------- run.py


def _wait_for_mid_round_checkpoint(model_dir, proc, timeout):
    """Waits until a checkpoint from inside a training round (round >= 1, step > 0) is
    committed (orbax renames it to its id when done); False if the run ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        root = model_dir / "checkpoints"
        ids = [int(p.name) for p in root.iterdir() if p.name.isdigit()] if root.exists() else []
        if any(i // ROUND_STRIDE >= 1 and i % ROUND_STRIDE > 0 for i in ids):
            return True
        time.sleep(0.05)
    return False


def test_resume_after_sigterm_or_sigkill_matches_an_uninterrupted_run(tmp_path, bigbench_dir):
    env = {"BIGBENCH_DIR": str(bigbench_dir)}
    full_dir, cut_dir, killed_dir = tmp_path / "full", tmp_path / "cut", tmp_path / "killed"
    full = run_py(quick_args(full_dir), env)
    killed = run_py(quick_args(killed_dir), env)
    # SIGKILL (no chance to save) right after the first mid-round checkpoint.
    assert _wait_for_mid_round_checkpoint(killed_dir, killed, timeout=400), killed.communicate()
    killed.kill()
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    restarted = run_py(quick_args(killed_dir), env)
    cut = run_py(quick_args(cut_dir), env)
    # Interrupt `cut` as soon as round 1 is on disk (it is then in round 2).
    assert wait_for_test_line(cut_dir, 1, [cut], timeout=400), cut.communicate()[1]
    cut.send_signal(signal.SIGTERM)
    out, err = cut.communicate(timeout=400)
    assert cut.returncode == 0, err
    assert "preempted" in err, err
    assert not metrics_log.is_done(cut_dir)
    resumed = run_py(quick_args(cut_dir), env)
    out, err = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, err
    assert "resumed from" in err + out
    out, err = full.communicate(timeout=400)
    assert full.returncode == 0, err
    out, err = restarted.communicate(timeout=400)
    assert restarted.returncode == 0, err
    assert "resumed from" in err + out

    assert metric_lines(cut_dir) == metric_lines(full_dir)
    assert metric_lines(killed_dir) == metric_lines(full_dir)
    assert metrics_log.is_done(cut_dir) and metrics_log.is_done(full_dir)
    # What a run leaves in MODEL_DIR.
    assert "LoopConfig.num_rounds = 2" in (full_dir / "config.gin").read_text()
    assert json.loads((full_dir / "run_info.json").read_text())["method"] == "hir"
    assert list((full_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert (full_dir / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (full_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert len((full_dir / "predictions" / "round_002.jsonl").read_text().splitlines()) == 16
    splits = [(r["round"], r["split"]) for r in metric_lines(full_dir)]
    assert splits == [(r, split) for r in range(3) for split in ("train", "test")]


@pytest.mark.usefixtures("clean_gin")
def test_run_py_rejects_bad_input_with_one_line(tmp_path, bigbench_dir, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    base = ["--gin_file=runs/hir.gin", "--gin_file=models/flan_t5_tiny.gin"]
    model_dir = f"--gin.MODEL_DIR='{tmp_path / 'run'}'"

    code, err = main_in_process([*base, "--gin.TASK='pet_rule'"], capsys)
    assert code == 2 and err == ["error: required macro MODEL_DIR is not set (--gin.MODEL_DIR=...)"]

    gin.clear_config()
    code, err = main_in_process(
        [*base, model_dir, "--gin.TASK='pet_rule'", "--gin.no_such.thing=1"], capsys
    )
    assert code == 2 and len(err) == 1 and "no_such" in err[0], err

    gin.clear_config()
    code, err = main_in_process([*base, model_dir, "--gin.TASK='pet_rulez'"], capsys)
    assert code == 2 and len(err) == 1 and "Did you mean: hir_bigbench.pet_rule" in err[0], err

    from hir_jax.checkpoints import save_hf
    from hir_jax.model.t5 import init_params

    small = get_config("tiny", vocab_size=1024, d_model=32, d_kv=8)
    save_hf(tmp_path / "ckpt", small, init_params(small, jax.random.key(0)))
    gin.clear_config()
    code, err = main_in_process(
        [*base, model_dir, "--gin.TASK='pet_rule'", f"--gin.INITIAL_CHECKPOINT='{tmp_path}/ckpt'"],
        capsys,
    )
    assert code == 2 and len(err) == 1 and "d_model" in err[0], err


def test_resume_refuses_another_model_shape(tmp_path, bigbench_dir, vocab):
    model_dir = tmp_path / "run"
    kw = dict(
        method=ZeroShot(),
        vocabulary=lambda: vocab,
        loop=LoopConfig(max_test_examples=8, eval_max_new_tokens=3),
    )
    _run_hir(model_dir, model_config=get_config("tiny", vocab_size=vocab.vocab_size), **kw)
    assert metrics_log.is_done(model_dir)
    bigger = get_config("tiny", vocab_size=vocab.vocab_size, d_ff=256)
    with pytest.raises(ValueError, match=r"different model shape \(d_ff: saved 128"):
        _run_hir(model_dir, model_config=bigger, **kw)


def test_resume_reads_only_the_config_of_the_initial_checkpoint(tmp_path, bigbench_dir, vocab):
    from hir_jax.checkpoints import save_hf
    from hir_jax.model.t5 import init_params

    config = get_config("tiny", vocab_size=vocab.vocab_size)
    save_hf(tmp_path / "hf", config, init_params(config, jax.random.key(3)))
    kw = dict(
        method=ZeroShot(),
        initial_checkpoint=str(tmp_path / "hf"),
        vocabulary=lambda: vocab,
        loop=LoopConfig(max_test_examples=8, eval_max_new_tokens=3),
    )
    first = _run_hir(tmp_path / "run", **kw)
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"weights gone")
    assert _run_hir(tmp_path / "run", **kw) == first  # resumed: the weights were not read
    with pytest.raises(Exception, match="model.safetensors"):
        _run_hir(tmp_path / "fresh", **kw)


def test_preemption_mid_warm_up_resumes_to_the_same_run(tmp_path, bigbench_dir, vocab, monkeypatch):
    # One HIR round after a 2-epoch warm-up; SIGTERM (as the loop sees it) at warm-up step 3.
    kw = dict(
        model_config=get_config("tiny", vocab_size=vocab.vocab_size),
        vocabulary=lambda: vocab,
        loop=LoopConfig(
            num_rounds=1,
            samples_per_query=2,
            max_new_tokens=4,
            eval_max_new_tokens=4,
            epochs=1,
            batch_size=16,
            max_train_examples=32,
            max_test_examples=8,
            warmup_task="hat_guess",
            warmup_epochs=2,
            checkpoint_every_steps=100,
        ),
    )
    full = _run_hir(tmp_path / "full", **kw)

    calls = []

    def stop_at_third(self):
        calls.append(1)
        return len(calls) == 3

    with monkeypatch.context() as patch:
        patch.setattr(Preemption, "should_stop", stop_at_third)
        with pytest.raises(Preempted):
            _run_hir(tmp_path / "cut", **kw)
    saved = sorted(int(p.name) for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert saved == [checkpoint_id(0, 3)]  # mid-warm-up, round 0 step 3
    resumed = _run_hir(tmp_path / "cut", **kw)
    assert {k: v for k, v in resumed.items() if k not in TIMING} == {
        k: v for k, v in full.items() if k not in TIMING
    }
    assert metric_lines(tmp_path / "cut") == metric_lines(tmp_path / "full")
    assert metric_lines(tmp_path / "full")[0]["warmup_steps"] > 3


@pytest.mark.parametrize("dedup, new_samples", [("call", [16, 16]), ("run", [16, 0])])
def test_buffer_grows_every_round_under_the_released_rule(tmp_path, vocab, dedup, new_samples):
    # K=1 from a model that repeats itself (top-k 1, learning rate 0: it never changes).
    loop = LoopConfig(
        eval_initial=False, num_rounds=2, samples_per_query=1, top_k=1, max_new_tokens=3,
        eval_max_new_tokens=3, epochs=1, batch_size=16, max_train_examples=16,
        max_test_examples=8, dedup=dedup,
    )  # fmt: skip
    _run_hir(
        tmp_path,
        model_config=get_config("tiny", vocab_size=vocab.vocab_size),
        vocabulary=lambda: vocab,
        loop=loop,
        optimizer=make_optimizer(learning_rate=0.0),
    )
    train = [r for r in metrics_log.read_metrics(tmp_path) if r["split"] == "train"]
    assert [r["new_samples"] for r in train] == new_samples
    assert [r["buffer_size"] for r in train] == list(np.cumsum(new_samples))


@pytest.mark.usefixtures("clean_gin")
def test_released_experiment_file_reproduces_the_released_training(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    files = ["runs/hir.gin", "models/flan_t5_small.gin", "experiments/released_hir.gin"]
    code, _ = main_in_process(
        [
            *[f"--gin_file={f}" for f in files],
            "--gin.MODEL_DIR='/x'",
            "--gin.TASK='t'",
            "--dry_run",
        ],
        capsys,
    )
    assert code == 0
    spec = runner.setup()  # the dry run's config, resolved as a run resolves it
    assert spec.loop.num_rounds == 31 and spec.loop.dedup == "call"  # 31 trainings
    assert spec.config.dropout_rate == 0.1 and spec.loss.forward_passes == 3
    assert spec.method.span_tokens == "text" and spec.method.relabel_instruction == "released"
    state = spec.abstract_state()
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {np.dtype("bfloat16")}
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
    assert moments and {x.dtype for x in moments} == {np.dtype("bfloat16")}
    assert spec.config.dtype == "bfloat16"


def test_released_kl_term_keeps_a_frozen_reference(tmp_path, vocab):
    # LossConfig.kl_coef (the released --kl_loss): the train state gains the frozen initial
    # model, and the KL to it grows from 0 as the policy moves.
    loop = LoopConfig(
        eval_initial=False, num_rounds=1, samples_per_query=1, max_new_tokens=3,
        eval_max_new_tokens=3, epochs=2, batch_size=8, max_train_examples=16,
        max_test_examples=8,
    )  # fmt: skip
    kw = dict(
        model_config=get_config("tiny", vocab_size=vocab.vocab_size),
        vocabulary=lambda: vocab,
        loop=loop,
        optimizer=make_optimizer(learning_rate=1e-2),
        loss=LossConfig(kl_coef=0.001),
    )
    spec = runner.setup(method=HIR(), partitioner=_one_device(), **kw)
    assert spec.extras.reference and spec.abstract_state().reference
    _run_hir(tmp_path, **kw)
    train = [r for r in metrics_log.read_metrics(tmp_path) if r["split"] == "train"]
    assert train[-1]["kl"] > 0

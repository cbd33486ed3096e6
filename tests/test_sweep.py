"""hir_jax.sweep: parsing sweep files, running trials with a fake runner, skipping finished
trials, printing commands, failures, and the paper's sweep file."""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from hir_jax import sweep
from tasks.bigbench import paper_task_names

# Stands in for run.py: logs its argv, then writes run_info.json, metrics.jsonl and DONE
# into MODEL_DIR (the method is the run gin file's name). A TASK containing "broken" exits 3;
# one containing "preempted" exits 0 without DONE.
FAKE_RUNNER = r"""
import ast, json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_RUNNER_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")
gin = {a[6:].split("=", 1)[0]: ast.literal_eval(a.split("=", 1)[1])
       for a in args if a.startswith("--gin.")}
files = [a.split("=", 1)[1] for a in args if a.startswith("--gin_file=")]
if "broken" in gin["TASK"]:
    print("fake runner: broken task", file=sys.stderr)
    sys.exit(3)
model_dir = gin["MODEL_DIR"]
os.makedirs(model_dir, exist_ok=True)
method = os.path.basename(files[-1]).removesuffix(".gin")
info = {"task": gin["TASK"], "method": method, "seed": gin["SEED"], "model": "fake"}
with open(os.path.join(model_dir, "run_info.json"), "w") as f:
    json.dump(info, f)
acc = {"hir": 0.75, "sft": 0.5}[method]
with open(os.path.join(model_dir, "metrics.jsonl"), "w") as f:
    for rnd, a in ((0, 0.25), (1, acc)):
        f.write(json.dumps({"round": rnd, "step": rnd, "split": "test", "time": 0.0,
                            "accuracy": a}) + "\n")
if "preempted" not in gin["TASK"]:
    open(os.path.join(model_dir, "DONE"), "w").close()
"""


@pytest.fixture
def setup(tmp_path, monkeypatch):
    runner = tmp_path / "fake_run.py"
    runner.write_text(FAKE_RUNNER)
    log = tmp_path / "runner.log"
    monkeypatch.setenv("FAKE_RUNNER_LOG", str(log))

    def write_sweep(tasks, methods=("hir", "sft")):
        path = tmp_path / "sweep.gin"
        path.write_text(
            f"TASKS = {list(tasks)!r}\n"
            "sweep.grid = {'TASK': %TASKS, 'METHOD': " + repr(list(methods)) + ", 'SEED': [0]}\n"
            "sweep.gin_files = {'hir': ['gin_configs/runs/hir.gin'],\n"
            "                   'sft': ['gin_configs/runs/sft.gin']}\n"
            "sweep.common_gin_files = ['gin_configs/models/flan_t5_tiny.gin']\n"
            "sweep.bindings = {'NUM_ROUNDS': 1}\n"
            f"sweep.command = ['{{python}}', {str(runner)!r}]\n"
        )
        return str(path)

    def invocations():
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]

    return write_sweep, invocations, tmp_path / "root"


def test_two_trials_then_skip_on_rerun(setup, capsys):
    write_sweep, invocations, root = setup
    sweep_file = write_sweep(["hir_bigbench.date_understanding"])
    assert sweep.main([f"--sweep_file={sweep_file}", f"--root_dir={root}"]) == 0
    calls = invocations()
    assert len(calls) == 2
    hir_dir = root / "hir-date_understanding-seed0"
    assert calls[0] == [
        "--gin_file=gin_configs/models/flan_t5_tiny.gin",
        "--gin_file=gin_configs/runs/hir.gin",
        f"--gin.MODEL_DIR='{hir_dir}'",
        "--gin.TASK='hir_bigbench.date_understanding'",
        "--gin.SEED=0",
        "--gin.NUM_ROUNDS=1",
    ]
    assert (hir_dir / "DONE").exists() and (root / "sft-date_understanding-seed0/DONE").exists()
    table = (root / "results.md").read_text()
    assert "| date_understanding | 50.0 | 75.0 |" in table  # columns SFT, HIR
    assert (root / "results.csv").read_text().startswith("task,sft,sft std,sft n,hir,")
    assert len(json.loads((root / sweep.TRIALS_FILE).read_text())) == 2
    out = capsys.readouterr()
    assert "| date_understanding | 50.0 | 75.0 |" in out.out

    # Re-run: both trials are DONE, the runner is not invoked, the table is rebuilt.
    assert sweep.main([f"--sweep_file={sweep_file}", f"--root_dir={root}"]) == 0
    assert len(invocations()) == 2
    err = capsys.readouterr().err
    assert err.count("done, skipping") == 2 and "0 run, 2 skipped" in err


def test_print_commands_runs_nothing(setup, capsys):
    write_sweep, invocations, root = setup
    sweep_file = write_sweep(["hir_bigbench.date_understanding", "hir_bigbench.object_counting"])
    argv = [f"--sweep_file={sweep_file}", f"--root_dir={root}", "--binding=EXTRA='a b'"]
    assert sweep.main([*argv, "--print_commands"]) == 0
    commands = capsys.readouterr().out.splitlines()
    assert len(commands) == 4 and invocations() == [] and not root.exists()
    argv0 = shlex.split(commands[0])
    trial = sweep.expand(sweep.with_bindings(sweep.load_sweep(sweep_file), ["EXTRA='a b'"]), root)[
        0
    ]
    assert argv0 == trial.command and trial.name == "hir-date_understanding-seed0"
    assert argv0[-1] == "--gin.EXTRA='a b'"
    assert f"--gin.MODEL_DIR=\"'{root}/hir-date_understanding-seed0'\"" in commands[0]
    assert [shlex.split(c)[-4] for c in commands] == [
        "--gin.TASK='hir_bigbench.date_understanding'",
        "--gin.TASK='hir_bigbench.date_understanding'",
        "--gin.TASK='hir_bigbench.object_counting'",
        "--gin.TASK='hir_bigbench.object_counting'",
    ]
    # --only selects trials; --dry_run shows status and runs nothing.
    assert sweep.main([*argv, "--print_commands", "--only=sft-*"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert sweep.main([*argv, "--dry_run"]) == 0
    assert capsys.readouterr().out.count("[pending]") == 4 and invocations() == []


def test_failed_trial_stops_with_clear_message(setup, capsys):
    write_sweep, invocations, root = setup
    sweep_file = write_sweep(["hir_bigbench.broken_task", "hir_bigbench.date_understanding"])
    assert sweep.main([f"--sweep_file={sweep_file}", f"--root_dir={root}"]) == 1
    err = capsys.readouterr().err
    assert "error: trial hir-broken_task-seed0 failed (exit code 3)" in err
    assert "re-run the same sweep command" in err and "--continue_on_error" in err
    assert len(invocations()) == 1  # stopped at the first failure

    argv = [f"--sweep_file={sweep_file}", f"--root_dir={root}", "--continue_on_error"]
    assert sweep.main(argv) == 1
    err = capsys.readouterr().err
    assert len(invocations()) == 1 + 4
    assert "2 run, 2 failed" not in err and "4 run, 0 skipped (done), 2 failed" in err
    assert "FAILED sft-broken_task-seed0: exit code 3" in err
    assert "| date_understanding | 50.0 | 75.0 |" in (root / "results.md").read_text()


def test_exit_zero_without_done_is_a_failure(setup):
    write_sweep, _, root = setup
    sweep_file = write_sweep(["hir_bigbench.preempted"], methods=["hir"])
    spec = sweep.load_sweep(sweep_file)
    with pytest.raises(sweep.SweepError, match="exit code 0 but no DONE marker"):
        sweep.run_sweep(spec, root, runner=subprocess.run)


def test_sweep_file_errors():
    ok = "sweep.gin_files = {'hir': ['a.gin']}\n"
    cases = {
        "sweep.grid = {'METHOD': ['hir', 'sft']}\n" + ok: "no entry for method(s) ['sft']",
        "sweep.grid = {'TASK': %NOPE}\n": "undefined macro %NOPE",
        "sweep.grid = {'SEED': [0]}\nsweep.gpus = 8\n": "unknown sweep parameter 'gpus'",
        "sweep.grid = {'SEED': [0]}\nrun.x = 1\n": "binds only sweep.<param> and macros",
        "sweep.gin_files = ['a.gin']\n": "no sweep.grid binding",
        "sweep.grid = {'SEED': [0, 0]}\n": "repeated values",
        "sweep.grid = {'SEED': [0]}\nsweep.bindings = ['SEED=1']\n": "sets SEED",
        "sweep.grid = {'MODEL_DIR': ['x']}\n": "cannot set MODEL_DIR",
        "sweep.grid = {'SEED': [0]\n": "cannot parse",
    }
    for text, message in cases.items():
        with pytest.raises(sweep.SweepError, match=re.escape(message)):
            sweep.parse_sweep(text)
    spec = sweep.parse_sweep(
        "sweep.grid = {'LR': [1e-4, 5e-4], 'NAME': ['a/b']}\n"
        "sweep.gin_files = 'r.gin'\nsweep.bindings = {'OPT': @adamw, 'T': (1,)}\n"
    )
    trials = sweep.expand(spec, "gs://bucket/root/")
    assert [t.name for t in trials] == ["lr0.0001-a_b", "lr0.0005-a_b"]
    assert trials[0].model_dir == "gs://bucket/root/lr0.0001-a_b"
    assert trials[0].command[-4:] == [
        "--gin.LR=0.0001",
        "--gin.NAME='a/b'",
        "--gin.OPT=@adamw",
        "--gin.T=(1,)",
    ]
    spec = sweep.parse_sweep("sweep.grid = {'A': ['x', 'y'], 'B': [1]}\nsweep.trial_name = 'a'\n")
    with pytest.raises(sweep.SweepError, match="same name 'a'"):
        sweep.expand(spec, "/tmp/r")


def test_paper_table_sweep_file(tmp_path):
    spec = sweep.load_sweep("gin_configs/sweeps/paper_table.gin")
    assert spec.grid["TASK"] == paper_task_names()
    trials = sweep.expand(spec, tmp_path)
    assert len(trials) == 12 * 6 and len({t.model_dir for t in trials}) == 72
    names = [t.name for t in trials]
    assert names[:6] == [
        f"{m}-tracking_shuffled_objects_three_objects-seed0"
        for m in ("zero_shot", "ppo", "grpo", "sft", "farl", "hir")
    ]
    assert trials[1].command[3] == "--gin_file=gin_configs/runs/ppo.gin"
    assert trials[2].command[3] == "--gin_file=gin_configs/runs/grpo.gin"
    hir = trials[5].command
    assert hir[1:4] == [
        "run.py",
        "--gin_file=gin_configs/models/flan_t5_large.gin",
        "--gin_file=gin_configs/runs/hir.gin",
    ]
    assert trials[0].command[3] == "--gin_file=gin_configs/runs/eval.gin"
    assert os.path.basename(hir[0]).startswith("python")


def test_ray_launcher_without_ray_says_how_to_install_it(setup, capsys, monkeypatch):
    write_sweep, invocations, root = setup
    sweep_file = write_sweep(["hir_bigbench.date_understanding"])
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    argv = [f"--sweep_file={sweep_file}", f"--root_dir={root}", "--launcher=ray"]
    assert sweep.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --launcher=ray needs Ray; install it with: pip install -e '.[ray]'"]
    assert invocations() == [] and not root.exists()

"""hir_jax.sweep --launcher=ray on a local Ray cluster (loopback only, 2 CPUs, one cluster
for the module, stopped at its end): trials in parallel with the sequential launcher's
metrics, a trial whose worker is killed is retried and resumes, a bad binding fails once
and is reported, a rerun skips finished trials."""

from __future__ import annotations

import json
import shutil
import time

import psutil
import pytest

from hir_jax import sweep

ray = pytest.importorskip("ray", reason="pip install -e '.[ray]' (make test installs it)")
from hir_jax import sweep_ray  # noqa: E402

# Stands in for run.py, resumable like it: per round it sleeps, appends the round's test
# accuracy to metrics.jsonl and writes checkpoint.json (the state the next round needs);
# a restart continues after the checkpoint's round. Each start is logged in
# attempts.jsonl. Files in the sweep root arm test behaviour: "barrier" (a number N) makes
# each trial wait until N trials have started, "kill_<trial>" kills the trial's first
# attempt after round 0: "self" by SIGKILL to itself, "worker" by SIGKILL to its Ray worker.
FAKE_RUNNER = r"""
import ast, json, os, signal, sys, time
args = sys.argv[1:]
gin = {a[6:].split("=", 1)[0]: ast.literal_eval(a.split("=", 1)[1])
       for a in args if a.startswith("--gin.")}
files = [a.split("=", 1)[1] for a in args if a.startswith("--gin_file=")]
model_dir = gin["MODEL_DIR"]
root, name = os.path.split(model_dir)
os.makedirs(model_dir, exist_ok=True)
ckpt_path = os.path.join(model_dir, "checkpoint.json")
ckpt = json.load(open(ckpt_path)) if os.path.exists(ckpt_path) else {"round": -1}
with open(os.path.join(model_dir, "attempts.jsonl"), "a") as f:
    f.write(json.dumps({"pid": os.getpid(), "from_round": ckpt["round"] + 1}) + "\n")
attempt = len(open(os.path.join(model_dir, "attempts.jsonl")).readlines())
barrier = os.path.join(root, "barrier")
if os.path.exists(barrier):
    started = os.path.join(root, "started")
    os.makedirs(started, exist_ok=True)
    open(os.path.join(started, name), "w").close()
    deadline = time.time() + 60
    while len(os.listdir(started)) < int(open(barrier).read()):
        if time.time() > deadline:
            sys.exit("error: fake runner: the other trials never started")
        time.sleep(0.05)
method = os.path.basename(files[-1]).removesuffix(".gin")
info = {"task": gin["TASK"], "method": method, "seed": gin["SEED"], "model": "fake"}
with open(os.path.join(model_dir, "run_info.json"), "w") as f:
    json.dump(info, f)
value = ckpt.get("value", {"hir": 0.3, "sft": 0.2}[method] + 0.01 * gin["SEED"])
kill = os.path.join(root, "kill_" + name)
for rnd in range(ckpt["round"] + 1, gin["NUM_ROUNDS"] + 1):
    time.sleep(0.3)
    value = round((value * 1.7 + 0.13) % 1, 6)
    with open(os.path.join(model_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"round": rnd, "step": rnd, "split": "test", "time": 0.0,
                            "accuracy": value}) + "\n")
    with open(ckpt_path + ".tmp", "w") as f:
        json.dump({"round": rnd, "value": value}, f)
    os.replace(ckpt_path + ".tmp", ckpt_path)
    if rnd == 0 and attempt == 1 and os.path.exists(kill):
        if open(kill).read().strip() == "self":
            os.kill(os.getpid(), signal.SIGKILL)
        os.setsid()  # out of the worker's process group, which Ray kills with the worker
        parent = open(f"/proc/{os.getppid()}/cmdline").read()
        if "ray::" not in parent:
            sys.exit(f"error: fake runner: parent {parent!r} is not a Ray worker")
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(30)  # the worker's death must kill this process first
        sys.exit("error: fake runner: outlived its worker")
open(os.path.join(model_dir, "DONE"), "w").close()
"""
TRIALS = ("hir-date_understanding-seed0", "sft-date_understanding-seed0")


@pytest.fixture(scope="module")
def ray_cluster():
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        mp.setenv(sweep_ray.LOCAL_ONLY_ENV, "0")  # connect sets it; undone after the module
        assert sweep_ray.connect("local", num_cpus=2, object_store_memory=100 * 1024**2)
        try:
            assert ray.util.get_node_ip_address() == "127.0.0.1"
            yield ray
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def fake_sweep(tmp_path_factory):
    """The fake runner's sweep file (one task, HIR and SFT) and its sequential run's root."""
    base = tmp_path_factory.mktemp("fake_sweep")
    (base / "fake_run.py").write_text(FAKE_RUNNER)
    sweep_file = base / "sweep.gin"
    sweep_file.write_text(
        "sweep.grid = {'TASK': ['hir_bigbench.date_understanding'], 'METHOD': ['hir', 'sft'],\n"
        "              'SEED': [0]}\n"
        "sweep.gin_files = {'hir': ['gin_configs/runs/hir.gin'],\n"
        "                   'sft': ['gin_configs/runs/sft.gin']}\n"
        "sweep.common_gin_files = ['gin_configs/models/flan_t5_tiny.gin']\n"
        "sweep.bindings = {'NUM_ROUNDS': 2}\n"
        f"sweep.command = ['{{python}}', {str(base / 'fake_run.py')!r}]\n"
        "sweep.max_retries = 0\n"
    )
    sequential = base / "sequential"
    assert sweep.main([f"--sweep_file={sweep_file}", f"--root_dir={sequential}"]) == 0
    return str(sweep_file), sequential


def _attempts(root, trial):
    path = root / trial / "attempts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _assert_same_results(root, sequential):
    for trial in TRIALS:
        metrics = (root / trial / "metrics.jsonl").read_text()
        assert metrics == (sequential / trial / "metrics.jsonl").read_text(), trial
        assert len(metrics.splitlines()) == 3 and (root / trial / "DONE").exists()
    for name in ("results.md", "results.csv"):
        assert (root / name).read_text() == (sequential / name).read_text()


def test_two_trials_run_in_parallel_with_the_sequential_metrics(
    ray_cluster, fake_sweep, tmp_path, capsys
):
    sweep_file, sequential = fake_sweep
    root = tmp_path / "root"
    root.mkdir()
    (root / "barrier").write_text("2")  # each trial waits for the other: run in parallel
    argv = [f"--sweep_file={sweep_file}", f"--root_dir={root}", "--launcher=ray"]
    assert sweep.main([*argv, "--max_parallel=2", '--resources={"CPU": 1}']) == 0
    _assert_same_results(root, sequential)
    assert sorted(p.name for p in (root / "started").iterdir()) == list(TRIALS)
    assert [len(_attempts(root, t)) for t in TRIALS] == [1, 1]
    captured = capsys.readouterr()
    assert "ray: 2 done, 0 running, 0 failed, 0 pending" in captured.err
    assert "2 run, 0 skipped (done), 0 failed" in captured.err
    assert "| date_understanding |" in captured.out


def test_a_trial_whose_worker_is_killed_is_retried_and_resumes(
    ray_cluster, fake_sweep, tmp_path, capsys
):
    sweep_file, sequential = fake_sweep
    root = tmp_path / "root"
    root.mkdir()
    (root / f"kill_{TRIALS[0]}").write_text("worker")  # SIGKILL to the Ray worker
    (root / f"kill_{TRIALS[1]}").write_text("self")  # SIGKILL to the trial's process
    argv = [f"--sweep_file={sweep_file}", f"--root_dir={root}", "--launcher=ray"]
    assert sweep.main([*argv, "--max_retries=1"]) == 0  # overrides sweep.max_retries = 0
    _assert_same_results(root, sequential)
    for trial in TRIALS:
        first, second = _attempts(root, trial)
        assert (first["from_round"], second["from_round"]) == (0, 1)  # resumed after round 0
    orphan = _attempts(root, TRIALS[0])[0]["pid"]
    assert not psutil.pid_exists(orphan) or psutil.Process(orphan).status() == "zombie"
    err = capsys.readouterr().err
    assert f"{TRIALS[0]}: died (WorkerCrashedError" in err
    assert f"{TRIALS[1]}: died (killed by SIGKILL); retry 1 of 1" in err
    assert f"{TRIALS[0]}: done (attempt 2)" in err and "2 run, 0 skipped (done), 0 failed" in err


def test_a_bad_binding_fails_once_and_is_reported(ray_cluster, fake_sweep, tmp_path):
    sweep_file, _ = fake_sweep
    root = tmp_path / "root"
    good = sweep.expand(sweep.load_sweep(sweep_file), root)[0]
    real = sweep.parse_sweep(  # the real run.py, with a binding of nothing it knows
        "sweep.grid = {'TASK': ['hir_bigbench.object_counting'], 'SEED': [0]}\n"
        "sweep.gin_files = ['gin_configs/runs/hir.gin']\n"
        "sweep.common_gin_files = ['gin_configs/models/flan_t5_tiny.gin']\n"
        "sweep.bindings = ['no_such.thing=1']\n"
    )
    (bad,) = sweep.expand(real, root)
    result = sweep_ray.run_trials_ray([bad, good], root, max_retries=2)
    assert result.attempts == {bad.name: 1, good.name: 1}
    ((name, why),) = result.failed
    assert name == bad.name == "object_counting-seed0"
    assert why.startswith("exit code 2: error: bad gin config: ValueError: No configurable")
    assert "no_such" in why and "\n" not in why
    assert not (root / bad.name).exists()  # refused before it wrote anything
    table = (root / "results.md").read_text()
    assert "| date_understanding |" in table
    assert f"Failed trials:\n\n- {bad.name}: exit code 2: error: bad gin config" in table


def test_a_rerun_skips_every_finished_trial(ray_cluster, fake_sweep, tmp_path, capsys):
    sweep_file, sequential = fake_sweep
    root = tmp_path / "root"
    shutil.copytree(sequential, root)  # both finished by the sequential launcher ...
    shutil.rmtree(root / TRIALS[1])  # ... then one is lost
    argv = [f"--sweep_file={sweep_file}", f"--root_dir={root}", "--launcher=ray"]
    assert sweep.main(argv) == 0
    assert [len(_attempts(root, t)) for t in TRIALS] == [1, 1]
    _assert_same_results(root, sequential)
    assert "1 run, 1 skipped (done), 0 failed" in capsys.readouterr().err
    start = time.time()
    assert sweep.main(argv) == 0
    assert [len(_attempts(root, t)) for t in TRIALS] == [1, 1]
    assert "0 run, 2 skipped (done), 0 failed" in capsys.readouterr().err
    assert time.time() - start < 10
    _assert_same_results(root, sequential)


def test_outcomes_resources_and_options():
    assert sweep_ray.classify(0, done=True) == sweep_ray.DONE
    for code in (0, -9, -15, 137, 143):  # no DONE, or killed: rerun
        assert sweep_ray.classify(code, done=False) == sweep_ray.DIED, code
    for code in (1, 2, 3, 127):  # the run itself said no: do not rerun
        assert sweep_ray.classify(code, done=False) == sweep_ray.FAILED, code
    assert sweep_ray.parse_resources('{"TPU": 4}') == {"TPU": 4.0}
    assert sweep_ray.task_options({"CPU": 2, "GPU": 1, "TPU": 4}) == {
        "max_retries": 0,
        "retry_exceptions": False,
        "num_cpus": 2,
        "num_gpus": 1,
        "resources": {"TPU": 4},
    }
    for text in ("{", '["GPU"]', '{"GPU": "one"}', '{"GPU": -1}'):
        with pytest.raises(sweep.SweepError, match="--resources"):
            sweep_ray.parse_resources(text)

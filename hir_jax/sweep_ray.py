"""``python -m hir_jax.sweep --launcher=ray``: each trial of a sweep is one Ray task.

    python -m hir_jax.sweep --sweep_file=... --root_dir=DIR --launcher=ray
        [--ray_address=ADDR] [--resources='{"GPU": 1}'] [--max_parallel=N] [--max_retries=N]

A task runs the trial's command (the one the sequential launcher runs, cwd = the
repository root) in a subprocess on a worker that holds ``--resources`` (``CPU``, ``GPU``
and any custom resource such as ``TPU``; Ray sets ``CUDA_VISIBLE_DEVICES`` /
``TPU_VISIBLE_CHIPS`` for it). Without an address (and no ``RAY_ADDRESS``) Ray starts a
cluster on this machine, bound to the loopback interface, and stops it at the end; with
``--ray_address=auto`` or ``HOST:PORT`` the trials go to a running cluster, whose nodes
must have the repository and its environment at the same paths as here, and see the
sweep root (shared storage: ``gs://`` or a network file system).

What becomes of a trial, from its exit:

* DONE in MODEL_DIR: finished (trials already DONE are never started);
* **died** -- killed by a signal (a negative exit code, or 128+N from a shell), exited 0
  without DONE (run.py saved and stopped on SIGTERM: preempted), or its Ray worker or node
  died: started again, up to ``--max_retries`` times (``sweep.max_retries``, default 2),
  resuming from MODEL_DIR;
* **failed** -- any other non-zero exit (run.py exits 2 on bad input such as an unknown
  gin binding, 3 on divergence): never retried, reported with its last stderr line. As
  in the sequential launcher, no further trial is started after a failure unless
  ``--continue_on_error`` (the running ones finish).

After each trial ends, a progress line (done / running / failed / pending) is printed and
``results.md`` / ``results.csv`` are rewritten with the trials that have results.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from hir_jax.paths import PathLike
from hir_jax.sweep import (
    REPO_ROOT,
    SweepError,
    SweepResult,
    Trial,
    _log,
    build_report,
    shell_join,
    write_trials_file,
)

INSTALL_HINT = "--launcher=ray needs Ray; install it with: pip install -e '.[ray]'"
# Ray's own switch for a single-node cluster on the loopback interface (meant for macOS and
# Windows; on Linux it makes the head node bind 127.0.0.1 instead of the host's address).
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Signals after which a trial is rerun when a shell reports them as exit code 128+N.
DIED_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGKILL, signal.SIGTERM)
# Ray errors that mean the worker or its node went away, not that the trial is wrong.
DIED_ERRORS = (
    "WorkerCrashedError",
    "NodeDiedError",
    "LocalRayletDiedError",
    "ObjectLostError",
    "OutOfMemoryError",
)
DONE, DIED, FAILED = "done", "died", "failed"


def require_ray() -> Any:
    """The ``ray`` module, or :class:`SweepError` saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise SweepError(INSTALL_HINT) from e
    return ray


def parse_resources(text: str | Mapping[str, float] | None) -> dict[str, float]:
    """``--resources`` (JSON object of resource name -> amount) as a dict."""
    if text is None:
        return {}
    try:
        value = json.loads(text) if isinstance(text, str) else dict(text)
    except json.JSONDecodeError as e:
        raise SweepError(f"--resources {text!r} is not JSON: {e}") from e
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool) and v >= 0
        for k, v in value.items()
    ):
        raise SweepError(
            f"--resources must be a JSON object of amounts, e.g. '{{\"GPU\": 1}}'; got {text!r}"
        )
    return {k: float(v) for k, v in value.items()}


def task_options(resources: Mapping[str, float]) -> dict[str, Any]:
    """Ray ``.options()`` for a trial holding ``resources`` (CPU/GPU/memory or custom)."""
    options: dict[str, Any] = {"max_retries": 0, "retry_exceptions": False}
    custom = {}
    for name, amount in resources.items():
        if name == "CPU":
            options["num_cpus"] = amount
        elif name == "GPU":
            options["num_gpus"] = amount
        elif name == "memory":
            options["memory"] = amount
        else:
            custom[name] = amount
    if custom:
        options["resources"] = custom
    return options


def classify(returncode: int, done: bool) -> str:
    """DONE, DIED (rerun it: killed or preempted) or FAILED (do not: the run said no)."""
    if done:
        return DONE
    if returncode == 0 or returncode < 0:
        return DIED
    if returncode > 128 and returncode - 128 in DIED_SIGNALS:
        return DIED
    return FAILED


def _exit_text(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    if returncode == 0:
        return "exit code 0 but no DONE marker (preempted?)"
    return f"exit code {returncode}"


def connect(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    object_store_memory: int | None = None,
) -> bool:
    """Join the cluster at ``address`` (else ``$RAY_ADDRESS``), or with neither (or
    ``"local"``) start one on this machine, on the loopback interface. False when Ray was
    already initialised here (the caller leaves it running); True when the caller is to
    ``ray.shutdown()``."""
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    local = address == "local"
    if local:
        os.environ[LOCAL_ONLY_ENV] = "0"
    ray = require_ray()
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"address": address, "include_dashboard": False}
    if local:
        # The variable is read when Ray is imported; set the flag too if that was earlier.
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
        kwargs.update(num_cpus=num_cpus, object_store_memory=object_store_memory)
    ray.init(**kwargs)
    return True


# Runs a command as a child that gets SIGKILL when its parent (the Ray worker) dies, so a
# retry never shares MODEL_DIR with an orphan: prctl(PR_SET_PDEATHSIG) survives the exec.
# (A preexec_fn would do the same but is unsafe in a process with threads, as a worker is.)
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(1)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def _tied_to_this_process(command: Sequence[str]) -> list[str]:
    if not sys.platform.startswith("linux"):
        return list(command)
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *command]


def run_trial(command: Sequence[str], cwd: str, model_dir: str) -> dict[str, Any]:
    """The body of a trial's Ray task: ``command`` in ``cwd``, its stderr passed through;
    returns the exit code, whether DONE exists, and the last stderr line."""
    from hir_jax import metrics_log

    if metrics_log.is_done(model_dir):
        return {"returncode": 0, "done": True, "error": "", "skipped": True}
    proc = subprocess.Popen(
        _tied_to_this_process(command),
        cwd=cwd,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
    )
    tail: collections.deque[str] = collections.deque(maxlen=20)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            if line.strip():
                tail.append(line)
        returncode = proc.wait()
    except KeyboardInterrupt:  # ray.cancel: let run.py save a checkpoint and stop
        proc.terminate()
        proc.wait()
        raise
    error = tail[-1].split("\r")[-1].strip() if tail else ""
    return {"returncode": returncode, "done": metrics_log.is_done(model_dir), "error": error}


def _outcome(ray: Any, ref: Any) -> tuple[str, str]:
    """(DONE/DIED/FAILED, why) of a finished task."""
    from hir_jax.gin_cli import one_line

    died = tuple(getattr(ray.exceptions, n) for n in DIED_ERRORS if hasattr(ray.exceptions, n))
    try:
        out = ray.get(ref)
    except died as e:
        return DIED, one_line(e)[:300]
    except ray.exceptions.RayTaskError as e:  # run_trial raised (e.g. no such program)
        return FAILED, one_line(e.cause if e.cause is not None else e)[:300]
    except ray.exceptions.RayError as e:
        return FAILED, one_line(e)[:300]
    status = classify(out["returncode"], out["done"])
    why = _exit_text(out["returncode"])
    if out["error"] and status != DONE:
        why += f": {out['error']}"
    return status, why


def _warn_if_unschedulable(ray: Any, options: Mapping[str, Any]) -> None:
    total = ray.cluster_resources()
    wanted = {
        "CPU": options.get("num_cpus", 1),
        "GPU": options.get("num_gpus", 0),
        **options.get("resources", {}),
    }
    short = {k: v for k, v in wanted.items() if v and total.get(k, 0) < v}
    if short:
        have = {k: total.get(k, 0) for k in short}
        _log(
            f"warning: the cluster has {have} but a trial needs {short}: trials wait until "
            "such a node joins (Ctrl-C to stop)"
        )


def run_trials_ray(
    trials: Sequence[Trial],
    root_dir: PathLike,
    *,
    address: str | None = None,
    resources: Mapping[str, float] | None = None,
    max_parallel: int | None = None,
    max_retries: int = 2,
    continue_on_error: bool = False,
    make_report: bool = True,
) -> SweepResult:
    """Run the unfinished ``trials`` as Ray tasks (see the module docstring); the table is
    rewritten after each trial ends. Uses Ray as initialised here if it is, else
    :func:`connect` (and shuts down what that started)."""
    if max_parallel is not None and max_parallel < 1:
        raise SweepError(f"--max_parallel must be >= 1, got {max_parallel}")
    if max_retries < 0:
        raise SweepError(f"--max_retries must be >= 0, got {max_retries}")
    ray = require_ray()
    options = task_options({"CPU": 1.0, **(resources or {})})
    write_trials_file(trials, root_dir)
    from hir_jax import metrics_log

    result = SweepResult()
    queue: collections.deque[Trial] = collections.deque()
    for trial in trials:
        if metrics_log.is_done(trial.model_dir):
            result.skipped.append(trial.name)
        else:
            queue.append(trial)
    _log(
        f"ray: {len(trials)} trials, {len(result.skipped)} done already, {len(queue)} to run "
        f"with {dict(resources or {'CPU': 1})} each (cwd {REPO_ROOT})"
    )
    failed: list[tuple[str, str]] = []
    finished = 0
    stopped = False

    def report(quiet: bool) -> str | None:
        return build_report(trials, root_dir, failed=failed, quiet=quiet) if make_report else None

    started_ray = connect(address) if queue else False
    try:
        remote = ray.remote(run_trial)
        if queue:
            _warn_if_unschedulable(ray, options)
        running: dict[Any, Trial] = {}
        while running or (queue and not stopped):
            while queue and not stopped and (max_parallel is None or len(running) < max_parallel):
                trial = queue.popleft()
                attempt = result.attempts[trial.name] = result.attempts.get(trial.name, 0) + 1
                if attempt == 1:
                    result.ran.append(trial.name)
                    _log(f"{trial.name}: starting\n  $ {shell_join(trial.command)}")
                ref = remote.options(name=trial.name, **options).remote(
                    trial.command, os.fspath(REPO_ROOT), trial.model_dir
                )
                running[ref] = trial
            (ref,), _ = ray.wait(list(running), num_returns=1)
            trial = running.pop(ref)
            status, why = _outcome(ray, ref)
            attempt = result.attempts[trial.name]
            retry = status == DIED and attempt <= max_retries
            if status == DONE:
                finished += 1
                _log(f"{trial.name}: done" + (f" (attempt {attempt})" if attempt > 1 else ""))
            elif retry:
                _log(
                    f"{trial.name}: died ({why}); retry {attempt} of {max_retries}, "
                    "resuming from its MODEL_DIR"
                )
                queue.appendleft(trial)
            else:
                if status == DIED:
                    why = f"died {attempt} times, the last: {why}"
                failed.append((trial.name, why))
                _log(f"{trial.name}: FAILED ({why})")
                if not continue_on_error and not stopped:
                    stopped = True
                    _log(
                        "no further trial is started (--continue_on_error goes on); "
                        "the running ones finish"
                    )
            if not retry:
                report(quiet=True)
            _log(
                f"ray: {finished + len(result.skipped)} done, {len(running)} running, "
                f"{len(failed)} failed, {len(queue)} pending"
            )
    except KeyboardInterrupt:
        for ref in running:
            ray.cancel(ref)  # run.py gets SIGTERM: it saves a checkpoint and stops
        ray.wait(list(running), num_returns=len(running), timeout=120)
        raise
    finally:
        if started_ray:
            ray.shutdown()
    result.failed = failed
    if stopped and queue:
        _log(f"{len(queue)} trials not started: {', '.join(t.name for t in queue)}")
    result.markdown = report(quiet=False)
    return result

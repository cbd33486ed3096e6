"""Launching ``run.py`` in subprocesses for the end-to-end tests (single and multi-host)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hir_jax import metrics_log

REPO = Path(__file__).resolve().parents[1]
TIMING = {"time", "decode_tokens_per_s", "sample_tokens_per_s", "examples_per_s"}


def run_py(
    args: Sequence[str], env_extra: dict[str, str], devices: int = 1
) -> subprocess.Popen[str]:
    """``python run.py ARGS`` on ``devices`` simulated CPU devices (1: a user's laptop)."""
    env = {**os.environ, "HIR_JAX_PROGRESS": "0", "TF_CPP_MIN_LOG_LEVEL": "3", **env_extra}
    env.pop("XLA_FLAGS", None)
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return subprocess.Popen(
        [sys.executable, str(REPO / "run.py"), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def main_in_process(argv: Sequence[str], capsys: Any) -> tuple[int, list[str]]:
    """``run.py``'s ``main`` in this process (gin cleared first, by the ``clean_gin``
    fixture): its exit code and its stderr lines."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import run as run_module

    code = run_module.main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def quick_args(model_dir: Path, task: str = "pet_rule") -> list[str]:
    """A two-round HIR run of the tiny model that checkpoints every 2 steps."""
    loop = "--gin.hir_jax.loop.LoopConfig."
    return [
        "--gin_file=runs/hir.gin",
        "--gin_file=models/flan_t5_tiny.gin",
        f"--gin.MODEL_DIR='{model_dir}'",
        f"--gin.TASK='{task}'",
        f"{loop}num_rounds=2",
        f"{loop}samples_per_query=2",
        f"{loop}max_new_tokens=5",
        f"{loop}eval_max_new_tokens=5",
        f"{loop}epochs=2",
        f"{loop}batch_size=16",
        f"{loop}max_train_examples=48",
        f"{loop}max_test_examples=16",
        f"{loop}checkpoint_every_steps=2",
        f"{loop}warmup_task='hat_guess'",
        f"{loop}warmup_epochs=1",
    ]


def metric_lines(model_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl without the wall-clock fields (which differ between runs)."""
    return [
        {k: v for k, v in r.items() if k not in TIMING} for r in metrics_log.read_metrics(model_dir)
    ]


def wait_for_test_line(
    model_dir: Path, round_index: int, procs: Sequence[subprocess.Popen[str]], timeout: float
) -> bool:
    """Waits until round ``round_index``'s test metrics are on disk; False if the processes
    ended first or the time ran out."""
    deadline = time.time() + timeout
    while time.time() < deadline and all(p.poll() is None for p in procs):
        lines = metrics_log.read_metrics(model_dir, missing_ok=True)
        if any(r["round"] == round_index and r["split"] == "test" for r in lines):
            return True
        time.sleep(0.2)
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]

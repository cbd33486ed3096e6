"""The README's commands are ones the code accepts: run.py commands parse (--dry_run) and
every ``python -m`` module exists and knows the flags the README gives it."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _commands() -> list[str]:
    """Shell commands in fenced blocks (continuations joined) and in inline code."""
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("python "):
                cmds.append(line)
    cmds += [c for c in re.findall(r"`(python [^`]+)`", README)]
    return cmds


def _env() -> dict[str, str]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("XLA_FLAGS", None)
    return env


RUN_COMMANDS = [c for c in _commands() if c.startswith("python run.py")]
MODULE_COMMANDS = sorted({c for c in _commands() if c.startswith("python -m ")})


def test_readme_has_the_commands_we_check():
    assert len(RUN_COMMANDS) >= 2
    modules = {shlex.split(c)[2] for c in MODULE_COMMANDS}
    assert {"tasks", "hir_jax.report", "hir_jax.sweep", "hir_jax.aot", "hir_jax.convert"} <= modules


@pytest.mark.parametrize("command", RUN_COMMANDS)
def test_run_commands_parse(command):
    argv = shlex.split(command)[2:] + ["--dry_run"]
    proc = subprocess.run(
        [sys.executable, "run.py", *argv], cwd=REPO, env=_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "MODEL_DIR = " in proc.stdout


def test_module_commands_exist_and_accept_their_flags():
    by_module: dict[str, set[str]] = {}
    for command in MODULE_COMMANDS:
        words = shlex.split(command.replace("...", ""))
        flags = {w.split("=")[0] for w in words[3:] if w.startswith("--")}
        by_module.setdefault(words[2], set()).update(flags)
    for module, flags in sorted(by_module.items()):
        proc = subprocess.run(
            [sys.executable, "-m", module, "--help"],
            cwd=REPO,
            env=_env(),
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, (module, proc.stderr[-2000:])
        for flag in flags:
            assert flag in proc.stdout, (module, flag)

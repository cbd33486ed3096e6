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
BENCH_COMMANDS = sorted({c for c in _commands() if c.startswith("python bench/")})


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


def _flags_by_program(commands: list[str], program_words: int) -> dict[tuple[str, ...], set[str]]:
    """``{program argv: flags the README gives it}``; the program is the first
    ``program_words`` words after ``python``."""
    out: dict[tuple[str, ...], set[str]] = {}
    for command in commands:
        words = shlex.split(command.replace("...", ""))
        program = tuple(words[1 : 1 + program_words])
        flags = {w.split("=")[0] for w in words[1 + program_words :] if w.startswith("--")}
        out.setdefault(program, set()).update(flags)
    return out


def _check_flags(by_program: dict[tuple[str, ...], set[str]]) -> None:
    for program, flags in sorted(by_program.items()):
        proc = subprocess.run(
            [sys.executable, *program, "--help"],
            cwd=REPO,
            env=_env(),
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, (program, proc.stderr[-2000:])
        for flag in flags:
            assert flag in proc.stdout, (program, flag)


def test_module_commands_exist_and_accept_their_flags():
    _check_flags(_flags_by_program(MODULE_COMMANDS, 2))


def test_bench_commands_exist_and_accept_their_flags():
    assert any(c.startswith("python bench/mini_study.py") for c in BENCH_COMMANDS)
    _check_flags(_flags_by_program(BENCH_COMMANDS, 1))

"""Sweeps: run.py over a grid of gin macros (tasks x methods x seeds), one trial at a time
or as parallel Ray tasks on a cluster.

    python -m hir_jax.sweep --sweep_file=gin_configs/sweeps/paper_table.gin --root_dir=DIR
        [--print_commands] [--dry_run] [--report_only] [--continue_on_error] [--only=GLOB]
        [--launcher=ray [--ray_address=ADDR] [--resources='{"GPU": 1}'] [--max_parallel=N]
         [--max_retries=N]]

A sweep file is gin syntax binding the parameters of ``sweep`` (parsed on its own: it
does not touch gin's global config, and run.py's configurables need not be importable):

    TASKS = ['hir_bigbench.date_understanding', 'hir_bigbench.object_counting']  # a macro
    sweep.grid = {                     # macro name -> values; trials = the product
        'TASK': %TASKS,
        'METHOD': ['hir', 'sft'],      # METHOD picks the run gin files (not a binding)
        'SEED': [0, 1],
    }
    sweep.gin_files = {                # METHOD value -> run gin files (a plain list
        'hir': ['gin_configs/runs/hir.gin'],        # when the grid has no METHOD)
        'sft': ['gin_configs/runs/sft.gin'],
    }
    sweep.common_gin_files = ['gin_configs/models/flan_t5_large.gin']   # every trial
    sweep.bindings = {'INITIAL_CHECKPOINT': 'gs://bucket/flan_t5_large'}  # or ['X=1', ...]
    sweep.command = ['{python}', 'run.py']     # default; {python} = this interpreter,
                                               # {repo} = the repository root
    sweep.trial_name = '{METHOD}-{TASK}-seed{SEED}'   # optional name template
    sweep.max_retries = 2              # --launcher=ray: reruns of a trial that died

``include 'other.gin'`` (relative to the including file, then the repository root) and
macros (``NAME = value`` / ``%NAME``) work as in gin; ``@name`` references are passed
through to run.py verbatim.

Each trial runs, with cwd = the repository root::

    {command} --gin_file=<common files> --gin_file=<METHOD's files>
        --gin.MODEL_DIR='<root_dir>/<trial>' --gin.TASK='<task>' --gin.SEED=<seed> ...
        --gin.<binding>=<value> ...

Grid values are written as gin literals (``repr``); every grid key except METHOD becomes a
``--gin.KEY=`` binding. The default trial name is the METHOD value, then the other values
in grid order, joined by "-": strings as they are (task names without ``hir_bigbench.``),
numbers as ``<key><value>`` (``hir-date_understanding-seed0``).

A trial whose MODEL_DIR holds ``DONE`` is skipped, so re-running the same command after an
interruption continues where it stopped. A trial that exits non-zero, or exits 0 without
writing DONE (preempted), stops the sweep with a message (``--continue_on_error`` goes on
and reports the failures at the end). At the end the combined table of the sweep's trials
(``hir_jax.report``) is printed and written to ``<root_dir>/results.md`` and
``results.csv``. ``--print_commands`` prints one shell command per unfinished trial (to be
run from the repository root, e.g. by a cluster launcher) and runs nothing; afterwards
``--report_only`` (or ``python -m hir_jax.report <root_dir>``) builds the table.

``--launcher=ray`` runs the same commands as Ray tasks, in parallel (``hir_jax.sweep_ray``:
retries of trials that died, progress, the table rewritten as each trial ends).
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import tokenize
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gin import config_parser

from hir_jax import metrics_log, report
from hir_jax.paths import PathLike, as_path
from tasks.bigbench import TASK_PREFIX

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_COMMAND = ("{python}", "run.py")
METHOD_KEY = "METHOD"
MODEL_DIR_MACRO = "MODEL_DIR"
SWEEP_PARAMS = (
    "grid", "gin_files", "common_gin_files", "bindings", "command", "trial_name", "max_retries",
)  # fmt: skip
DEFAULT_MAX_RETRIES = 2
TRIALS_FILE = "sweep_trials.json"


class SweepError(Exception):
    """A malformed sweep file or a failed trial (the message says what to do)."""


# ---------------------------------------------------------------------------------------
# Parsing the sweep file
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GinReference:
    """``@name`` / ``@name()`` in a sweep file, written back verbatim to run.py."""

    name: str
    evaluate: bool

    def __repr__(self) -> str:
        return f"@{self.name}()" if self.evaluate else f"@{self.name}"


@dataclasses.dataclass(frozen=True)
class _Macro:
    name: str


class _Delegate(config_parser.ParserDelegate):
    def configurable_reference(self, scoped_configurable_name: str, evaluate: bool) -> Any:
        return GinReference(scoped_configurable_name, evaluate)

    def macro(self, macro_name: str) -> Any:
        return _Macro(macro_name)


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep file (see the module docstring for the meaning of each field)."""

    grid: dict[str, list[Any]]
    gin_files: dict[str, list[str]] | list[str]
    common_gin_files: list[str]
    bindings: list[str]
    command: list[str]
    trial_name: str | None = None
    source: str = "<string>"
    max_retries: int | None = None


def _where(location: config_parser.Location, filename: str) -> str:
    return f"{location.filename or filename}:{location.line_num}"


def _read_statements(
    text: str,
    filename: str,
    params: dict[str, tuple[Any, str]],
    macros: dict[str, tuple[Any, str]],
    seen: tuple[str, ...] = (),
) -> None:
    """Parse ``text`` into ``params`` (sweep.X) and ``macros``, following includes."""
    try:
        statements = list(config_parser.ConfigParser(text, _Delegate()))
    except (SyntaxError, tokenize.TokenError, ValueError) as e:
        raise SweepError(f"{filename}: cannot parse: {e}") from e
    for statement in statements:
        if isinstance(statement, config_parser.IncludeStatement):
            path = _resolve_include(statement.filename, filename)
            if os.fspath(path) in seen:
                raise SweepError(f"{_where(statement.location, filename)}: include cycle")
            _read_statements(
                path.read_text(), os.fspath(path), params, macros, (*seen, os.fspath(path))
            )
        elif isinstance(statement, config_parser.BindingStatement):
            where = _where(statement.location, filename)
            if statement.scope:
                raise SweepError(f"{where}: scopes are not supported in sweep files")
            if statement.selector == "sweep":
                if statement.arg_name not in SWEEP_PARAMS:
                    raise SweepError(
                        f"{where}: unknown sweep parameter {statement.arg_name!r}; "
                        f"known: {', '.join(SWEEP_PARAMS)}"
                    )
                params[statement.arg_name] = (statement.value, where)
            elif not statement.arg_name and "." not in statement.selector:
                macros[statement.selector] = (statement.value, where)
            else:
                raise SweepError(
                    f"{where}: a sweep file binds only sweep.<param> and macros, not "
                    f"{statement.selector}.{statement.arg_name} (put run settings in "
                    "sweep.bindings or in a gin file)"
                )
        elif isinstance(statement, config_parser.BlockDeclaration):
            continue  # its bindings follow as BindingStatements
        else:
            raise SweepError(f"{filename}: imports are not supported in sweep files")


def _resolve_include(name: str, including: str) -> Any:
    candidates = [as_path(name)] if os.path.isabs(name) or "://" in name else []
    if not candidates:
        candidates = [as_path(including).parent / name, as_path(REPO_ROOT / name)]
    for path in candidates:
        if path.exists():
            return path
    raise SweepError(f"{including}: cannot find included file {name!r}")


def _resolve_macros(value: Any, macros: Mapping[str, tuple[Any, str]], where: str) -> Any:
    if isinstance(value, _Macro):
        if value.name not in macros:
            raise SweepError(f"{where}: undefined macro %{value.name}")
        inner, inner_where = macros[value.name]
        return _resolve_macros(inner, macros, inner_where)
    if isinstance(value, list | tuple):
        return type(value)(_resolve_macros(v, macros, where) for v in value)
    if isinstance(value, dict):
        return {k: _resolve_macros(v, macros, where) for k, v in value.items()}
    return value


def _str_list(value: Any, what: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise SweepError(f"{what} must be a list of strings, got {value!r}")
    return list(value)


def parse_sweep(text: str, *, filename: str = "<string>") -> SweepSpec:
    """Parse and check the text of a sweep file."""
    params: dict[str, tuple[Any, str]] = {}
    macros: dict[str, tuple[Any, str]] = {}
    _read_statements(text, filename, params, macros, (filename,))
    values = {k: _resolve_macros(v, macros, where) for k, (v, where) in params.items()}

    if "grid" not in values:
        raise SweepError(f"{filename}: no sweep.grid binding")
    grid_raw = values["grid"]
    if not isinstance(grid_raw, dict) or not grid_raw:
        raise SweepError(f"{params['grid'][1]}: sweep.grid must be a non-empty dict")
    grid: dict[str, list[Any]] = {}
    for key, options in grid_raw.items():
        if not isinstance(key, str) or not config_parser.IDENTIFIER_RE.match(key):
            raise SweepError(f"sweep.grid key {key!r} is not a gin macro name")
        if key == MODEL_DIR_MACRO:
            raise SweepError(f"sweep.grid cannot set {MODEL_DIR_MACRO}: the driver sets it")
        options = list(options) if isinstance(options, list | tuple) else [options]
        if not options:
            raise SweepError(f"sweep.grid[{key!r}] is empty")
        if len({repr(o) for o in options}) != len(options):
            raise SweepError(f"sweep.grid[{key!r}] has repeated values: {options!r}")
        grid[key] = options

    gin_files_raw = values.get("gin_files", [])
    if isinstance(gin_files_raw, dict):
        if METHOD_KEY not in grid:
            raise SweepError(
                f"sweep.gin_files is keyed by method but sweep.grid has no {METHOD_KEY!r}"
            )
        gin_files: dict[str, list[str]] | list[str] = {
            str(m): _str_list(f, f"sweep.gin_files[{m!r}]") for m, f in gin_files_raw.items()
        }
        missing = [m for m in grid[METHOD_KEY] if m not in gin_files]
        if missing:
            raise SweepError(
                f"sweep.gin_files has no entry for method(s) {missing}; it has {sorted(gin_files)}"
            )
    else:
        if METHOD_KEY in grid:
            raise SweepError(
                f"sweep.grid has {METHOD_KEY!r}: sweep.gin_files must map each method to "
                "its run gin files"
            )
        gin_files = _str_list(gin_files_raw, "sweep.gin_files")

    bindings_raw = values.get("bindings", {})
    if isinstance(bindings_raw, dict):
        bindings = [f"{name}={gin_literal(v)}" for name, v in bindings_raw.items()]
    else:
        bindings = _str_list(bindings_raw, "sweep.bindings")
    check_bindings(bindings, grid)

    command = _str_list(values.get("command", list(DEFAULT_COMMAND)), "sweep.command")
    if not command:
        raise SweepError("sweep.command is empty")
    trial_name = values.get("trial_name")
    if trial_name is not None and not isinstance(trial_name, str):
        raise SweepError(f"sweep.trial_name must be a format string, got {trial_name!r}")
    max_retries = values.get("max_retries")
    if max_retries is not None and (
        isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0
    ):
        raise SweepError(f"sweep.max_retries must be an integer >= 0, got {max_retries!r}")
    return SweepSpec(
        grid=grid,
        gin_files=gin_files,
        common_gin_files=_str_list(values.get("common_gin_files", []), "common_gin_files"),
        bindings=bindings,
        command=command,
        trial_name=trial_name,
        source=filename,
        max_retries=max_retries,
    )


def check_bindings(bindings: Sequence[str], grid: Mapping[str, Any]) -> None:
    """Each binding is NAME=VALUE and sets neither a grid key nor MODEL_DIR."""
    for binding in bindings:
        name = binding.split("=", 1)[0].strip()
        if "=" not in binding or not name:
            raise SweepError(f"binding {binding!r} is not NAME=VALUE")
        if name in grid or name == MODEL_DIR_MACRO:
            raise SweepError(f"binding {binding!r} sets {name}, which the grid or driver sets")


def with_bindings(spec: SweepSpec, bindings: Sequence[str]) -> SweepSpec:
    """``spec`` with more gin bindings (``NAME=VALUE``, gin syntax) for every trial."""
    check_bindings(bindings, spec.grid)
    return dataclasses.replace(spec, bindings=[*spec.bindings, *bindings])


def load_sweep(sweep_file: PathLike) -> SweepSpec:
    """Read a sweep file (a path relative to the cwd, else to the repository root)."""
    path = as_path(sweep_file)
    if not path.exists() and not os.path.isabs(os.fspath(sweep_file)):
        path = as_path(REPO_ROOT / os.fspath(sweep_file))
    if not path.exists():
        raise SweepError(f"{sweep_file}: no such sweep file")
    return parse_sweep(path.read_text(), filename=os.fspath(path))


# ---------------------------------------------------------------------------------------
# Trials
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Trial:
    """One grid point: its name, parameter values, MODEL_DIR and command line."""

    name: str
    params: dict[str, Any]
    model_dir: str
    command: list[str]


def gin_literal(value: Any) -> str:
    """A Python value as gin binding text (strings quoted, ``@refs`` verbatim)."""
    if isinstance(value, list):
        return "[" + ", ".join(gin_literal(v) for v in value) + "]"
    if isinstance(value, tuple):
        inner = ", ".join(gin_literal(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{gin_literal(k)}: {gin_literal(v)}" for k, v in value.items()) + "}"
        )
    return repr(value)


def _sanitize(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", text).strip("_")


def _name_part(key: str, value: Any) -> str:
    if isinstance(value, str):
        return _sanitize(value.removeprefix(TASK_PREFIX)) or key.lower()
    return _sanitize(f"{key.lower()}{value}")


def shell_quote(arg: str) -> str:
    """Quote one argument for a POSIX shell, readably: ``--gin.TASK="'name'"``."""
    if shlex.quote(arg) == arg:
        return arg
    if not any(c in arg for c in '"$`\\!\n'):
        head, sep, value = arg.partition("=")
        if sep and shlex.quote(head) == head:
            return f'{head}="{value}"'
        return f'"{arg}"'
    return shlex.quote(arg)


def shell_join(command: Sequence[str]) -> str:
    """A command line as one shell string (see :func:`shell_quote`)."""
    return " ".join(shell_quote(a) for a in command)


def trial_name(params: Mapping[str, Any], template: str | None = None) -> str:
    """The deterministic directory name of a trial (see the module docstring)."""
    if template is not None:
        try:
            parts = {
                k: _name_part(k, v) if isinstance(v, str) else _sanitize(str(v))
                for k, v in params.items()
            }
            return template.format(**parts)
        except (KeyError, IndexError, ValueError) as e:
            raise SweepError(f"sweep.trial_name {template!r}: {e!r}") from e
    keys = ([METHOD_KEY] if METHOD_KEY in params else []) + [k for k in params if k != METHOD_KEY]
    return "-".join(_name_part(k, params[k]) for k in keys)


def _root_text(root_dir: PathLike) -> str:
    text = os.fspath(root_dir)
    if "://" in text:
        return text.rstrip("/")
    return os.path.abspath(os.path.expanduser(text))


def expand(spec: SweepSpec, root_dir: PathLike) -> list[Trial]:
    """All trials of the grid (first grid key varies slowest), with their commands."""
    root = _root_text(root_dir)
    keys = list(spec.grid)
    trials: list[Trial] = []
    names: dict[str, dict[str, Any]] = {}
    for combo in itertools.product(*(spec.grid[k] for k in keys)):
        params = dict(zip(keys, combo, strict=True))
        name = trial_name(params, spec.trial_name)
        if name in names:
            raise SweepError(
                f"trials {names[name]} and {params} get the same name {name!r}; "
                "set sweep.trial_name to tell them apart"
            )
        names[name] = params
        model_dir = f"{root}/{name}"
        if isinstance(spec.gin_files, dict):
            files = spec.common_gin_files + spec.gin_files[params[METHOD_KEY]]
        else:
            files = spec.common_gin_files + spec.gin_files
        substitutions = {"python": sys.executable, "repo": os.fspath(REPO_ROOT)}
        command = [part.format(**substitutions) for part in spec.command]
        command += [f"--gin_file={f}" for f in files]
        command.append(f"--gin.{MODEL_DIR_MACRO}={gin_literal(model_dir)}")
        command += [f"--gin.{k}={gin_literal(v)}" for k, v in params.items() if k != METHOD_KEY]
        command += [f"--gin.{b}" for b in spec.bindings]
        trials.append(Trial(name=name, params=params, model_dir=model_dir, command=command))
    return trials


def missing_gin_files(spec: SweepSpec) -> list[str]:
    """The sweep's gin files that exist neither as given nor under the repository root."""
    files = list(spec.common_gin_files)
    groups = spec.gin_files.values() if isinstance(spec.gin_files, dict) else [spec.gin_files]
    for group in groups:
        files += group
    missing = []
    for name in dict.fromkeys(files):
        if "://" in name:
            continue
        if not (os.path.exists(name) or (REPO_ROOT / name).exists()):
            missing.append(name)
    return missing


def select_trials(trials: Sequence[Trial], patterns: Sequence[str]) -> list[Trial]:
    """The trials whose names match any of the fnmatch ``patterns`` (all if none)."""
    if not patterns:
        return list(trials)
    chosen = [t for t in trials if any(fnmatch.fnmatchcase(t.name, p) for p in patterns)]
    if not chosen:
        raise SweepError(f"no trial matches {list(patterns)}")
    return chosen


# ---------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class SweepResult:
    """What a sweep did: trial names run, skipped (already DONE) and failed (with why);
    ``attempts``: how many times each trial was started (the Ray launcher's retries)."""

    ran: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    markdown: str | None = None
    attempts: dict[str, int] = dataclasses.field(default_factory=dict)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_report(
    trials: Sequence[Trial],
    root_dir: PathLike,
    *,
    failed: Sequence[tuple[str, str]] = (),
    quiet: bool = False,
) -> str | None:
    """Write ``results.md`` / ``results.csv`` under ``root_dir`` from the trials that have
    metrics; returns the Markdown (None when no trial has any yet). ``failed`` (name, why)
    are listed under the table in ``results.md``; ``quiet`` logs nothing."""
    log = (lambda message: None) if quiet else _log
    dirs = [t.model_dir for t in trials if (as_path(t.model_dir) / "run_info.json").exists()]
    if not dirs:
        log("no trial has written results yet: no table")
        return None
    root = _root_text(root_dir)
    try:
        _, markdown, notes = report.report(dirs, strict=False, csv_path=f"{root}/results.csv")
    except report.ReportError as e:
        log(f"no table: {e}")
        return None
    if failed:
        markdown += "\nFailed trials:\n\n" + "".join(f"- {n}: {why}\n" for n, why in failed)
    (as_path(root) / "results.md").write_text(markdown)
    for note in notes:
        log(note)
    log(f"table written to {root}/results.md and {root}/results.csv")
    return markdown


def write_trials_file(trials: Sequence[Trial], root_dir: PathLike) -> None:
    """Create ``root_dir`` and list the sweep's trials in it (``sweep_trials.json``)."""
    root = as_path(_root_text(root_dir))
    root.mkdir(parents=True, exist_ok=True)
    (root / TRIALS_FILE).write_text(
        json.dumps([dataclasses.asdict(t) for t in trials], indent=2, default=repr) + "\n"
    )


def run_sweep(
    spec: SweepSpec,
    root_dir: PathLike,
    *,
    only: Sequence[str] = (),
    continue_on_error: bool = False,
    make_report: bool = True,
    runner: Callable[..., subprocess.CompletedProcess] = subprocess.run,
) -> SweepResult:
    """Run the unfinished trials in turn (cwd = repository root), then build the table.

    Raises :class:`SweepError` at the first failed trial unless ``continue_on_error``
    (then the failures are in the result). The table is built either way.
    """
    trials = select_trials(expand(spec, root_dir), only)
    return run_trials(
        trials, root_dir, continue_on_error=continue_on_error, make_report=make_report,
        runner=runner,
    )  # fmt: skip


def run_trials(
    trials: Sequence[Trial],
    root_dir: PathLike,
    *,
    continue_on_error: bool = False,
    make_report: bool = True,
    runner: Callable[..., subprocess.CompletedProcess] = subprocess.run,
) -> SweepResult:
    """``run_sweep`` over given trials (e.g. ``expand``'s, with per-trial bindings added):
    each unfinished one runs as ``runner(command, cwd=REPO_ROOT, check=False)``."""
    write_trials_file(trials, root_dir)
    result = SweepResult()
    error: SweepError | None = None
    for i, trial in enumerate(trials, start=1):
        tag = f"[{i}/{len(trials)}] {trial.name}"
        if metrics_log.is_done(trial.model_dir):
            _log(f"{tag}: done, skipping")
            result.skipped.append(trial.name)
            continue
        _log(f"{tag}: running\n  $ {shell_join(trial.command)}")
        completed = runner(trial.command, cwd=REPO_ROOT, check=False)
        result.ran.append(trial.name)
        result.attempts[trial.name] = 1
        if completed.returncode != 0:
            why = f"exit code {completed.returncode}"
        elif not metrics_log.is_done(trial.model_dir):
            why = f"exit code 0 but no DONE marker in {trial.model_dir} (preempted or stopped?)"
        else:
            continue
        result.failed.append((trial.name, why))
        message = (
            f"trial {trial.name} failed ({why}).\n  command: {shell_join(trial.command)}\n"
            f"  MODEL_DIR: {trial.model_dir}"
        )
        if continue_on_error:
            _log(f"{tag}: FAILED ({why}); continuing")
            continue
        error = SweepError(
            message + "\n  Fix it and re-run the same sweep command: finished trials are "
            "skipped and this one resumes from its checkpoint (or pass --continue_on_error)."
        )
        break
    if make_report:
        result.markdown = build_report(trials, root_dir, failed=result.failed)
    if error is not None:
        raise error
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status (1 if a trial failed)."""
    parser = argparse.ArgumentParser(
        prog="python -m hir_jax.sweep",
        description="Run (or print) one run.py command per point of a sweep grid.",
    )
    parser.add_argument("--sweep_file", required=True)
    parser.add_argument("--root_dir", required=True, help="trials go to ROOT_DIR/<trial>")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--print_commands",
        action="store_true",
        help="print one command per unfinished trial (run from the repo root); run nothing",
    )
    mode.add_argument(
        "--dry_run", action="store_true", help="show every trial, its status and command"
    )
    mode.add_argument(
        "--report_only", action="store_true", help="only build the table of the trials"
    )
    parser.add_argument(
        "--binding",
        action="append",
        default=[],
        help="extra gin binding NAME=VALUE for every trial, e.g. INITIAL_CHECKPOINT='gs://...'",
    )
    parser.add_argument(
        "--continue_on_error",
        action="store_true",
        help="go on after a failed trial (by default no further trial is started)",
    )
    parser.add_argument(
        "--only", action="append", default=[], help="run only trials matching this glob"
    )
    ray_flags = parser.add_argument_group(
        "ray", "--launcher=ray: each trial is a Ray task (pip install -e '.[ray]')"
    )
    ray_flags.add_argument(
        "--launcher",
        choices=("sequential", "ray"),
        default="sequential",
        help="sequential: one trial after another here; ray: trials in parallel on Ray",
    )
    ray_flags.add_argument(
        "--ray_address",
        help="a running cluster to join ('auto', 'HOST:6379'); default: $RAY_ADDRESS if set, "
        "else a local cluster on this machine, stopped at the end",
    )
    ray_flags.add_argument(
        "--resources",
        default='{"CPU": 1}',
        help="each trial's Ray resources as JSON, e.g. '{\"GPU\": 1}', '{\"TPU\": 4}' "
        "(default: %(default)s)",
    )
    ray_flags.add_argument(
        "--max_parallel", type=int, help="at most N trials at once (default: as Ray schedules)"
    )
    ray_flags.add_argument(
        "--max_retries",
        type=int,
        help="reruns of a trial that died (killed, preempted), each resuming from its "
        f"MODEL_DIR (default: sweep.max_retries, else {DEFAULT_MAX_RETRIES})",
    )
    args = parser.parse_args(argv)
    try:
        spec = with_bindings(load_sweep(args.sweep_file), args.binding)
        trials = select_trials(expand(spec, args.root_dir), args.only)
        missing = missing_gin_files(spec)
        if missing:
            _log(f"warning: gin files not found (relative to {REPO_ROOT}): {missing}")
        if args.print_commands:
            pending = [t for t in trials if not metrics_log.is_done(t.model_dir)]
            _log(f"# {len(pending)} of {len(trials)} trials unfinished; run from {REPO_ROOT}")
            for trial in pending:
                print(shell_join(trial.command))
            return 0
        if args.dry_run:
            for trial in trials:
                status = "done" if metrics_log.is_done(trial.model_dir) else "pending"
                print(f"{trial.name} [{status}]\n  $ {shell_join(trial.command)}")
            print(f"{len(trials)} trials; cwd {REPO_ROOT}")
            return 0
        if args.report_only:
            markdown = build_report(trials, args.root_dir)
            if markdown is not None:
                print(markdown, end="")
            return 0 if markdown is not None else 1
        if args.launcher == "ray":
            from hir_jax import sweep_ray

            max_retries = args.max_retries
            if max_retries is None:
                max_retries = DEFAULT_MAX_RETRIES if spec.max_retries is None else spec.max_retries
            result = sweep_ray.run_trials_ray(
                trials,
                args.root_dir,
                address=args.ray_address,
                resources=sweep_ray.parse_resources(args.resources),
                max_parallel=args.max_parallel,
                max_retries=max_retries,
                continue_on_error=args.continue_on_error,
            )
        else:
            result = run_sweep(
                spec, args.root_dir, only=args.only, continue_on_error=args.continue_on_error
            )
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to continue the sweep", file=sys.stderr)
        return 130
    if result.markdown is not None:
        print(result.markdown, end="")
    _log(
        f"sweep: {len(result.ran)} run, {len(result.skipped)} skipped (done), "
        f"{len(result.failed)} failed"
    )
    for name, why in result.failed:
        _log(f"  FAILED {name}: {why}")
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Results table in the paper's shape: tasks x methods, final test accuracy (%).

    python -m hir_jax.report MODEL_DIR_OR_SWEEP_ROOT... [--best] [--csv out.csv]
        [--markdown out.md] [--paper] [--metric accuracy] [--split test]

Each argument is a run directory (one with ``run_info.json`` / ``metrics.jsonl``), a glob
of them (``'runs/hir-*'``, quoted so the shell leaves it alone; ``gs://`` globs work too),
or any directory above runs (a sweep root), which is walked for ``run_info.json``.

A run contributes the value of ``--metric`` on ``--split`` at its last round (the
highest (round, step) record that has it), or its best round with ``--best``. Fractions
(accuracy, ``*_rate``) are shown in %. Rows are tasks (the paper's 12 in the paper's order
first), columns are methods (No training, PPO, SFT, FARL, HIR, then others; a run_info
``variant`` gives its own column). A cell is the mean over seeds, "mean ± std" (sample
std) when there are several; "*" marks a cell with a run that has no ``DONE`` marker yet.
The Average row is the mean of the task means of a column. ``--paper`` adds the numbers
of HIR_REFERENCE.md ("Results to compare with") as extra columns.

The Markdown table goes to stdout (and ``--markdown``); ``--csv`` writes the same table
with mean, std and n columns per method.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import glob as glob_lib
import io
import math
import os
import statistics
import sys
from collections.abc import Sequence

from etils import epath

from hir_jax import metrics_log
from hir_jax.paths import PathLike, as_path
from tasks.bigbench import PAPER_TASKS, TASK_PREFIX
from tasks.synthetic import TASK_PREFIX as SYNTHETIC_PREFIX

METHOD_ORDER = ("zero_shot", "ppo", "grpo", "sft", "farl", "hir")
METHOD_NAMES = {
    "zero_shot": "No training",
    "ppo": "PPO",
    "grpo": "GRPO",
    "sft": "SFT",
    "farl": "FARL",
    "hir": "HIR",
}

# HIR_REFERENCE.md, "Results to compare with" (FLAN-T5-large, test accuracy %).
PAPER_RESULTS: dict[str, dict[str, float]] = {
    "tracking_shuffled_objects_three_objects": {
        "zero_shot": 29.3,
        "ppo": 35.0,
        "farl": 90.0,
        "hir": 100.0,
    },
    "tracking_shuffled_objects_five_objects": {
        "zero_shot": 15.6,
        "ppo": 15.6,
        "farl": 15.6,
        "hir": 61.2,
    },
    "logical_deduction_three_objects": {"zero_shot": 33.3, "ppo": 57.0, "farl": 86.7, "hir": 91.7},
    "date_understanding": {"zero_shot": 35.1, "ppo": 90.5, "farl": 98.0, "hir": 98.0},
    "object_counting": {"zero_shot": 31.0, "ppo": 33.0, "farl": 56.7, "hir": 65.0},
    "geometric_shapes": {"zero_shot": 9.7, "ppo": 11.0, "farl": 66.7, "hir": 90.3},
}
# The paper's averages over all 12 tasks.
PAPER_AVERAGES = {"zero_shot": 26.8, "ppo": 34.7, "farl": 56.1, "hir": 67.3}

Column = tuple[str, str | None]  # (method, variant)


class ReportError(Exception):
    """A run directory that cannot be reported (the message says which and why)."""


@dataclasses.dataclass(frozen=True)
class RunResult:
    """The number one run contributes to the table."""

    model_dir: str
    task: str
    method: str
    variant: str | None
    seed: int | None
    value: float
    round: int
    done: bool


@dataclasses.dataclass
class Cell:
    """The runs of one (task, column): their values and seeds."""

    runs: list[RunResult]

    @property
    def values(self) -> list[float]:
        return [r.value for r in self.runs]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def done(self) -> bool:
        return all(r.done for r in self.runs)


@dataclasses.dataclass
class Average:
    """The Average row entry of a column: mean of task means over ``n_tasks`` tasks, and
    the std over seeds of per-seed averages when every task has the same >= 2 seeds."""

    mean: float
    std: float | None
    n_tasks: int


@dataclasses.dataclass
class Table:
    """tasks x columns of :class:`Cell`, plus the Average row."""

    tasks: list[str]
    columns: list[Column]
    cells: dict[tuple[str, Column], Cell]
    averages: dict[Column, Average]
    metric: str = "accuracy"
    split: str = "test"
    best: bool = False


# ---------------------------------------------------------------------------------------
# Finding and reading runs
# ---------------------------------------------------------------------------------------


def _has_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def _glob(pattern: str) -> list[epath.Path]:
    if "://" not in pattern:
        return [as_path(p) for p in sorted(glob_lib.glob(os.path.expanduser(pattern)))]
    parts = pattern.split("/")
    first = next(i for i, part in enumerate(parts) if _has_magic(part))
    base = epath.Path("/".join(parts[:first]))
    return sorted(base.glob("/".join(parts[first:])), key=os.fspath)


def _canonical(path: epath.Path) -> str:
    text = os.fspath(path)
    return text.rstrip("/") if "://" in text else os.path.abspath(text)


def _is_run_dir(path: epath.Path) -> bool:
    return (path / metrics_log.RUN_INFO_FILE).exists() or (path / metrics_log.METRICS_FILE).exists()


def _walk_runs(root: epath.Path) -> list[epath.Path]:
    """Directories under ``root`` holding run_info.json (not descending into runs)."""
    found = []
    for dirpath, dirnames, filenames in root.walk(top_down=True):
        if metrics_log.RUN_INFO_FILE in filenames:
            found.append(dirpath)
            dirnames[:] = []  # a run's checkpoints hold no further runs
        else:
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    return sorted(found, key=os.fspath)


def find_run_dirs(paths: Sequence[PathLike]) -> list[tuple[epath.Path, bool]]:
    """Run directories named by ``paths`` (dirs, globs, sweep roots), deduplicated.

    Each comes with ``explicit``: True when the argument named the run itself (then a
    missing metrics file is an error), False when found by walking a root (then such a run
    is skipped with a note: a sweep may still be running).
    """
    out: dict[str, tuple[epath.Path, bool]] = {}
    for arg in paths:
        text = os.fspath(arg)
        matches = _glob(text) if _has_magic(text) else [as_path(text)]
        if not matches:
            raise ReportError(f"{text}: no directory matches")
        for path in matches:
            if not path.exists():
                raise ReportError(f"{path}: no such directory")
            if _is_run_dir(path):
                found = [(path, True)]
            elif path.is_dir():
                found = [(p, False) for p in _walk_runs(path)]
                if not found:
                    raise ReportError(
                        f"{path}: no run directories under it (no {metrics_log.RUN_INFO_FILE} "
                        f"or {metrics_log.METRICS_FILE})"
                    )
            else:
                raise ReportError(f"{path}: not a directory")
            for run_dir, explicit in found:
                key = _canonical(run_dir)
                previous = out.get(key)
                out[key] = (run_dir, explicit or (previous is not None and previous[1]))
    return list(out.values())


def load_run(
    model_dir: PathLike, *, metric: str = "accuracy", split: str = "test", best: bool = False
) -> RunResult:
    """The table entry of one run: ``metric`` on ``split`` at the last (or best) round.

    Raises :class:`ReportError` with the directory and the reason when the run has no
    run_info.json, no metrics.jsonl, or no such metric.
    """
    model_dir = as_path(model_dir)
    try:
        info = metrics_log.read_run_info(model_dir)
    except FileNotFoundError as e:
        raise ReportError(
            f"{model_dir}: no {metrics_log.RUN_INFO_FILE}, so its task and method are unknown"
        ) from e
    missing = [k for k in ("task", "method") if not info.get(k)]
    if missing:
        raise ReportError(f"{model_dir}/{metrics_log.RUN_INFO_FILE}: missing {missing}")
    try:
        records = metrics_log.read_metrics(model_dir)
    except FileNotFoundError as e:
        raise ReportError(str(e)) from e
    except ValueError as e:
        raise ReportError(f"{model_dir}: unreadable {metrics_log.METRICS_FILE}: {e}") from e
    points = metrics_log.select(records, split, metric)
    if not points:
        raise ReportError(
            f"{model_dir}: {metrics_log.METRICS_FILE} has no {metric!r} on split {split!r} "
            "(no evaluation written yet?)"
        )
    if best:
        rnd, _, value = max(points, key=lambda p: (p[2], -p[0]))  # earliest best round
    else:
        rnd, _, value = points[-1]
    if metrics_log.is_fraction_metric(metric):
        value *= 100.0
    seed = info.get("seed")
    return RunResult(
        model_dir=os.fspath(model_dir),
        task=str(info["task"]),
        method=str(info["method"]),
        variant=str(info["variant"]) if info.get("variant") else None,
        seed=int(seed) if seed is not None else None,
        value=float(value),
        round=rnd,
        done=metrics_log.is_done(model_dir),
    )


def collect_runs(
    paths: Sequence[PathLike],
    *,
    metric: str = "accuracy",
    split: str = "test",
    best: bool = False,
    strict: bool | None = None,
) -> tuple[list[RunResult], list[str]]:
    """Load every run under ``paths``; returns (results, notes about skipped runs).

    ``strict=None``: runs named explicitly must load, runs found by walking a root are
    skipped with a note. True / False make every run strict / skippable.
    """
    results, notes = [], []
    for run_dir, explicit in find_run_dirs(paths):
        try:
            results.append(load_run(run_dir, metric=metric, split=split, best=best))
        except ReportError as e:
            if strict or (strict is None and explicit):
                raise
            notes.append(f"skipped {e}")
    if not results:
        raise ReportError("no runs to report" + ("".join("\n  " + n for n in notes)))
    return results, notes


# ---------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------


def short_task(task: str) -> str:
    """The task name without the ``hir_bigbench.`` (or ``hir_synthetic.``) prefix."""
    return task.removeprefix(TASK_PREFIX).removeprefix(SYNTHETIC_PREFIX)


def task_label(task: str) -> str:
    """Row label: ``tracking_shuffled_objects (3)`` for the paper's object-count tasks
    (``color_pick (3)`` for the synthetic ones)."""
    short = short_task(task)
    for word, number in (("three", 3), ("five", 5), ("seven", 7)):
        for suffix in (f"_{word}_objects", f"_{word}"):
            if short.endswith(suffix):
                return f"{short.removesuffix(suffix)} ({number})"
    return short


def column_label(column: Column) -> str:
    """Column header: "HIR", "No training", or "HIR (variant)"."""
    method, variant = column
    name = METHOD_NAMES.get(method, method)
    return f"{name} ({variant})" if variant else name


def _task_order(task: str) -> tuple[int, str, int]:
    short = short_task(task)
    paper = list(PAPER_TASKS)
    if short in paper:
        return paper.index(short), "", 0
    label = task_label(task)  # "color_pick (5)": by name, then by level
    base, _, level = label.rpartition(" (")
    if base and level.endswith(")") and level[:-1].isdigit():
        return len(paper), base, int(level[:-1])
    return len(paper), short, 0


def _column_order(column: Column) -> tuple[int, str, str]:
    method, variant = column
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return (rank, method, variant or "")


def build_table(
    runs: Sequence[RunResult], *, metric: str = "accuracy", split: str = "test", best: bool = False
) -> Table:
    """Group runs into cells (task x (method, variant)) and compute the Average row.

    Raises :class:`ReportError` when two runs share task, method, variant and seed (give
    one of them a ``variant`` in run_info.json, or report them separately).
    """
    cells: dict[tuple[str, Column], Cell] = {}
    seen: dict[tuple[str, Column, int | None], str] = {}
    for run in runs:
        column = (run.method, run.variant)
        key = (run.task, column, run.seed)
        if key in seen:
            raise ReportError(
                f"two runs of {run.task} / {column_label(column)} / seed {run.seed}: "
                f"{seen[key]} and {run.model_dir}"
            )
        seen[key] = run.model_dir
        cells.setdefault((run.task, column), Cell([])).runs.append(run)
    tasks = sorted({t for t, _ in cells}, key=_task_order)
    columns = sorted({c for _, c in cells}, key=_column_order)
    averages = {}
    for column in columns:
        col_cells = [cells[(t, column)] for t in tasks if (t, column) in cells]
        mean = statistics.fmean(c.mean for c in col_cells)
        std = None
        seed_sets = [frozenset(r.seed for r in c.runs) for c in col_cells]
        if len(seed_sets[0]) > 1 and None not in seed_sets[0] and len(set(seed_sets)) == 1:
            per_seed = [
                statistics.fmean(r.value for c in col_cells for r in c.runs if r.seed == s)
                for s in sorted(seed_sets[0])
            ]
            std = statistics.stdev(per_seed)
        averages[column] = Average(mean=mean, std=std, n_tasks=len(col_cells))
    return Table(tasks, columns, cells, averages, metric=metric, split=split, best=best)


def _fmt(mean: float, std: float | None) -> str:
    if math.isnan(mean):
        return "nan"
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def to_markdown(table: Table, *, paper: bool = False) -> str:
    """The table as Markdown, with a caption line and footnotes."""
    ns = {c.n for c in table.cells.values()}
    uniform_n = len(ns) == 1
    header = ["Task"] + [column_label(c) for c in table.columns]
    paper_methods = [m for m in METHOD_ORDER if m in PAPER_AVERAGES] if paper else []
    header += [f"{METHOD_NAMES[m]} (paper)" for m in paper_methods]
    rows = []
    unfinished = False
    for task in table.tasks:
        row = [task_label(task)]
        for column in table.columns:
            cell = table.cells.get((task, column))
            if cell is None:
                row.append("—")
                continue
            text = _fmt(cell.mean, cell.std)
            if not uniform_n:
                text += f" (n={cell.n})"
            if not cell.done:
                text += "*"
                unfinished = True
            row.append(text)
        reference = PAPER_RESULTS.get(short_task(task), {})
        row += [_fmt(reference[m], None) if m in reference else "—" for m in paper_methods]
        rows.append(row)
    average = ["**Average**"]
    partial = False
    for column in table.columns:
        avg = table.averages[column]
        text = _fmt(avg.mean, avg.std)
        if avg.n_tasks < len(table.tasks):
            text += f" ({avg.n_tasks}/{len(table.tasks)} tasks)"
            partial = True
        average.append(text)
    average += [_fmt(PAPER_AVERAGES[m], None) + "†" for m in paper_methods]
    rows.append(average)

    what = "best round" if table.best else "last round"
    metric = table.metric
    if metrics_log.is_fraction_metric(metric):
        metric += " (%)"
    caption = f"{table.split.capitalize()} {metric}, {what}"
    if uniform_n:
        (n,) = ns
        caption += f"; mean ± std over {n} seeds" if n > 1 else "; 1 seed"
    else:
        caption += "; mean ± std over n seeds"
    lines = [caption + ".", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    notes = []
    if unfinished:
        notes.append("\\* a run has not finished (no DONE marker): its latest round is shown.")
    if partial:
        notes.append("Averages marked (k/N tasks) cover only the tasks that column has.")
    if paper_methods:
        notes.append(
            "(paper): FLAN-T5-large numbers from HIR_REFERENCE.md; † the paper's average "
            "over all 12 tasks."
        )
    if notes:
        lines += [""] + notes
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """The table as CSV: ``task`` then ``<column>``, ``<column> std``, ``<column> n`` per
    column (full task names; the last row is ``Average``, whose n is the number of tasks)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["task"]
    for column in table.columns:
        label = column[0] if column[1] is None else f"{column[0]}:{column[1]}"
        header += [label, f"{label} std", f"{label} n"]
    writer.writerow(header)

    def num(x: float | None) -> str:
        return "" if x is None else f"{x:.4f}"

    for task in table.tasks:
        row = [task]
        for column in table.columns:
            cell = table.cells.get((task, column))
            row += ["", "", ""] if cell is None else [num(cell.mean), num(cell.std), cell.n]
        writer.writerow(row)
    row = ["Average"]
    for column in table.columns:
        avg = table.averages[column]
        row += [num(avg.mean), num(avg.std), avg.n_tasks]
    writer.writerow(row)
    return buffer.getvalue()


def report(
    paths: Sequence[PathLike],
    *,
    metric: str = "accuracy",
    split: str = "test",
    best: bool = False,
    strict: bool | None = None,
    markdown_path: PathLike | None = None,
    csv_path: PathLike | None = None,
    paper: bool = False,
) -> tuple[Table, str, list[str]]:
    """Collect runs, build the table, write the requested files.

    Returns (table, markdown, notes about skipped runs).
    """
    runs, notes = collect_runs(paths, metric=metric, split=split, best=best, strict=strict)
    table = build_table(runs, metric=metric, split=split, best=best)
    markdown = to_markdown(table, paper=paper)
    if markdown_path is not None:
        _write_text(markdown_path, markdown)
    if csv_path is not None:
        _write_text(csv_path, to_csv(table))
    return table, markdown, notes


def _write_text(path: PathLike, text: str) -> None:
    out = as_path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m hir_jax.report",
        description="Results table (tasks x methods) from HIR run directories.",
    )
    parser.add_argument("paths", nargs="+", help="run dirs, globs, or sweep roots")
    parser.add_argument("--best", action="store_true", help="best round instead of the last")
    parser.add_argument("--metric", default="accuracy")
    parser.add_argument("--split", default="test")
    parser.add_argument("--csv", help="write the table as CSV here")
    parser.add_argument("--markdown", help="write the Markdown table here")
    parser.add_argument("--paper", action="store_true", help="add the paper's numbers")
    args = parser.parse_args(argv)
    if args.paper and (args.metric, args.split) != ("accuracy", "test"):
        parser.error("--paper compares test accuracy only")
    try:
        _, markdown, notes = report(
            args.paths,
            metric=args.metric,
            split=args.split,
            best=args.best,
            markdown_path=args.markdown,
            csv_path=args.csv,
            paper=args.paper,
        )
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for note in notes:
        print(note, file=sys.stderr)
    print(markdown, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A comparison of methods from shared starting points: ``bench/mini_study.py`` and the demo.

A study is a list of tasks x columns x seeds. A column is a method's run file plus gin
bindings (``HIR (no_entropy)`` is runs/hir.gin with the entropy term off); every trial
gets the study's shared gin files after its run file. Per (task, seed) there is one
starting point: a format-only SFT warm-up (``LoopConfig.warmup_task``, a run of
``runs/sft.gin`` with ``num_rounds=0``) saved as an HF checkpoint, which every column's
trial reads as its ``INITIAL_CHECKPOINT``. Trials run through ``hir_jax.sweep`` (a trial
whose MODEL_DIR holds DONE is skipped, so re-running continues), in this process by
default (``run.py``'s ``main``; the XLA compilation cache is shared between them).

Outputs under the root: ``results.md`` (one table per column group, in the report's
shape: task x column, final test accuracy, mean ± std over seeds), ``runs.csv`` (every
evaluation of every trial: task, column, seed, round, samples drawn, accuracy) and
``study.png`` (test accuracy against samples drawn, one line per column, the seed spread
shaded).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import io
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from hir_jax import metrics_log, report, sweep
from hir_jax.paths import PathLike, as_path


@dataclasses.dataclass(frozen=True)
class Column:
    """One method setting: ``gin_files`` (run file first) and ``bindings`` (``NAME=VALUE``);
    ``variant`` labels it in the report ("HIR (paper)"); ``group`` picks its table."""

    name: str
    gin_files: tuple[str, ...]
    bindings: tuple[str, ...] = ()
    variant: str | None = None
    group: str = "main"

    @property
    def label(self) -> str:
        return report.column_label((self.name.split("-")[0], self.variant))


PAPER_HIR = ("runs/hir.gin", "experiments/paper_hir.gin")


def _ablation(variant: str, *bindings: str) -> Column:
    """HIR with the paper's settings, one part taken out (the paper's Table 4)."""
    return Column(f"hir-{variant}", PAPER_HIR, bindings, variant, "ablation")


HIR_METHOD = "hir_jax.methods.HIR."
LOSS = "hir_jax.train.LossConfig."
COLUMNS: dict[str, Column] = {
    c.name: c
    for c in (
        Column("zero_shot", ("runs/eval.gin",)),
        Column("ppo", ("runs/ppo.gin",)),
        Column("grpo", ("runs/grpo.gin",)),
        Column("sft", ("runs/sft.gin",)),
        Column("farl", ("runs/farl.gin",)),
        Column("hir-released", ("runs/hir.gin",), (), "released"),
        Column("hir-paper", PAPER_HIR, (), "paper"),
        _ablation("no_sub_output", f"{HIR_METHOD}sub_output=False"),
        _ablation("no_entropy", f"{LOSS}beta=0.0"),
        _ablation("no_label_smoothing", f"{LOSS}label_smoothing=0.0"),
        _ablation("no_hindsight", f"{HIR_METHOD}hindsight=False"),
    )
}
ABLATION_BASE = "hir-paper"  # the ablations' table and panels show it beside them
GROUP_TITLES = {
    "main": "Methods",
    "ablation": "HIR ablations (the paper's settings without one part, as its Table 4)",
}


@dataclasses.dataclass(frozen=True)
class Study:
    """What to run: ``tasks`` (SeqIO names), their format-only warm-up tasks
    (``warmup_tasks[task]``), ``columns``, ``seeds``; ``gin_files`` and ``bindings`` are
    shared by every trial (after each column's own files)."""

    root_dir: str
    tasks: tuple[str, ...]
    warmup_tasks: dict[str, str]
    columns: tuple[Column, ...]
    seeds: tuple[int, ...] = (0,)
    gin_files: tuple[str, ...] = ("experiments/mini_study.gin",)
    bindings: tuple[str, ...] = ()
    warmup_epochs: int = 10
    grouped: bool = True  # a table per column group (methods, ablations); else one

    def __post_init__(self) -> None:
        missing = [t for t in self.tasks if t not in self.warmup_tasks]
        if missing:
            raise ValueError(f"no warm-up task for {missing}")

    def start_dir(self, task: str, seed: int) -> str:
        return f"{self.root_dir}/start/{_short(task)}-seed{seed}"

    def start_checkpoint(self, task: str, seed: int) -> str:
        return f"{self.start_dir(task, seed)}/hf"


def _short(task: str) -> str:
    return report.short_task(task)


def _command(study: Study, files: Sequence[str], model_dir: str, bindings: Sequence[str]):
    command = [sys.executable, "run.py"]
    command += [f"--gin_file={f}" for f in files]
    command.append(f"--gin.MODEL_DIR={sweep.gin_literal(model_dir)}")
    return command + [f"--gin.{b}" for b in (*bindings, *study.bindings)]


def start_trials(study: Study) -> list[sweep.Trial]:
    """The warm-up run of each (task, seed): SFT on the warm-up task, then round 0 only."""
    loop = "hir_jax.loop.LoopConfig."
    out = []
    for task in study.tasks:
        for seed in study.seeds:
            model_dir = study.start_dir(task, seed)
            bindings = [
                f"TASK={task!r}",
                f"SEED={seed}",
                f"{loop}num_rounds=0",
                f"{loop}warmup_task={study.warmup_tasks[task]!r}",
                f"{loop}warmup_epochs={study.warmup_epochs}",
            ]
            files = ["runs/sft.gin", *study.gin_files]
            command = _command(study, files, model_dir, bindings)
            name = f"start-{_short(task)}-seed{seed}"
            out.append(sweep.Trial(name, {"TASK": task, "SEED": seed}, model_dir, command))
    return out


def trials(study: Study) -> list[sweep.Trial]:
    """Every (task, column, seed) trial, its MODEL_DIR under ``root_dir/runs``."""
    out = []
    for task in study.tasks:
        for column in study.columns:
            for seed in study.seeds:
                name = f"{column.name}-{_short(task)}-seed{seed}"
                model_dir = f"{study.root_dir}/runs/{name}"
                bindings = [
                    f"TASK={task!r}",
                    f"SEED={seed}",
                    f"INITIAL_CHECKPOINT={study.start_checkpoint(task, seed)!r}",
                    *column.bindings,
                ]
                if column.variant:
                    bindings.append(f"hir_jax.runner.run.variant={column.variant!r}")
                files = [*column.gin_files, *study.gin_files]
                params = {"TASK": task, "METHOD": column.name, "SEED": seed}
                command = _command(study, files, model_dir, bindings)
                out.append(sweep.Trial(name, params, model_dir, command))
    return out


def in_process(command: Sequence[str], cwd: Any = None, check: bool = False):
    """``sweep``'s runner without a new process: ``run.py``'s ``main`` on the arguments
    (gin cleared first). Imports, and compilations through the persistent cache, are
    shared between trials."""
    import gin

    del cwd, check
    if sweep.REPO_ROOT.as_posix() not in sys.path:
        sys.path.insert(0, sweep.REPO_ROOT.as_posix())
    import run as run_py

    gin.clear_config()
    try:
        code = run_py.main(list(command[2:]))
    finally:
        gin.clear_config()
    return subprocess.CompletedProcess(list(command), code)


def enable_compilation_cache(path: PathLike | None = None) -> None:
    """XLA's persistent compilation cache (a trial recompiles the same programs as the
    previous one; the cache turns that into a file read)."""
    import jax

    from tasks.cache import cache_dir

    folder = as_path(path) if path is not None else cache_dir() / "xla"
    jax.config.update("jax_compilation_cache_dir", os.fspath(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def _export_start(study: Study, trial: sweep.Trial) -> None:
    from hir_jax import convert

    task, seed = trial.params["TASK"], trial.params["SEED"]
    target = study.start_checkpoint(task, seed)
    if not (as_path(target) / "config.json").exists():
        if convert.main([trial.model_dir, target, "--to", "hf"]) != 0:
            raise sweep.SweepError(f"could not export the starting point {trial.model_dir}")


def run_study(
    study: Study,
    *,
    only: Sequence[str] = (),
    runner: Any = in_process,
    log: Any = print,
    plot_name: str = "study.png",
) -> dict[str, str]:
    """Runs the unfinished starting points and trials (``only``: globs over trial names),
    then writes the tables, CSV and plot; returns their paths (``write_outputs``)."""
    begin = time.perf_counter()
    starts = start_trials(study)
    sweep.run_trials(starts, study.root_dir, make_report=False, runner=runner)
    for trial in starts:
        _export_start(study, trial)
    chosen = [t for t in trials(study) if not only or any(fnmatch.fnmatch(t.name, p) for p in only)]
    sweep.run_trials(chosen, f"{study.root_dir}/runs", make_report=False, runner=runner)
    elapsed = time.perf_counter() - begin
    log(f"study: {len(chosen)} trials and {len(starts)} starting points in {elapsed:.0f} s")
    return write_outputs(study, plot_name)


# ---------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------


def curves(study: Study) -> list[dict[str, Any]]:
    """One row per evaluation of every trial that has metrics (``runs.csv``'s rows)."""
    rows = []
    columns = {c.name: c for c in study.columns}
    for trial in trials(study):
        if not (as_path(trial.model_dir) / metrics_log.METRICS_FILE).exists():
            continue
        info = metrics_log.read_run_info(trial.model_dir)
        per_round = int(info.get("samples_per_round", 0))
        records = metrics_log.read_metrics(trial.model_dir)
        for rnd, _, value in metrics_log.select(records, "test", "accuracy"):
            rows.append(
                {
                    "task": trial.params["TASK"],
                    "column": columns[trial.params["METHOD"]].label,
                    "seed": trial.params["SEED"],
                    "round": rnd,
                    "samples_drawn": rnd * per_round,
                    "accuracy": value,
                    "done": metrics_log.is_done(trial.model_dir),
                }
            )
    return rows


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    import csv

    buffer = io.StringIO()
    fields = ["task", "column", "seed", "round", "samples_drawn", "accuracy", "done"]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def groups(study: Study) -> list[tuple[str, list[Column]]]:
    """(title, columns) of each table and plot row: the columns of each group, the
    ablations beside ``ABLATION_BASE``; one group of every column when not ``grouped``."""
    if not study.grouped:
        return [(GROUP_TITLES["main"], list(study.columns))]
    out = []
    base = [c for c in study.columns if c.name == ABLATION_BASE]
    for group, title in GROUP_TITLES.items():
        columns = [c for c in study.columns if c.group == group]
        if group == "ablation" and columns:
            columns = base + columns
        if columns:
            out.append((title, columns))
    return out


def tables(study: Study) -> str:
    """The Markdown tables (``report``'s shape), one per group that has runs."""
    parts = []
    for title, columns in groups(study):
        names = {c.name for c in columns}
        dirs = [
            t.model_dir
            for t in trials(study)
            if t.params["METHOD"] in names
            and (as_path(t.model_dir) / metrics_log.RUN_INFO_FILE).exists()
        ]
        if dirs:
            runs, _ = report.collect_runs(dirs, strict=False)
            parts.append(f"### {title}\n\n" + report.to_markdown(report.build_table(runs)))
    return "\n".join(parts)


def plot(study: Study, rows: Sequence[dict[str, Any]], path: PathLike) -> None:
    """Test accuracy against samples drawn: a panel per (group, task), a line per column
    (the mean over seeds) with mean ± std over seeds shaded."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows_of = groups(study)
    colors = [f"C{i}" for i in range(10)] + ["black", "olive"]  # one per column throughout
    # A method that samples nothing (SFT, no training) is drawn at its rounds' places on
    # the sampling budget of the same task's sampling methods.
    budget: dict[str, int] = {}
    for r in rows:
        if r["round"] > 0:
            per = r["samples_drawn"] // r["round"]
            budget[r["task"]] = max(budget.get(r["task"], 0), per)
    fig = Figure(figsize=(4.2 * len(study.tasks), 3.4 * len(rows_of)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows_of), len(study.tasks), squeeze=False)
    for gi, (title, columns) in enumerate(rows_of):
        for ti, task in enumerate(study.tasks):
            ax = axes[gi][ti]
            for column in columns:
                points: dict[int, list[float]] = {}
                for r in rows:
                    if r["task"] == task and r["column"] == column.label:
                        x = r["samples_drawn"] or r["round"] * budget.get(task, 0)
                        points.setdefault(x, []).append(100 * r["accuracy"])
                if not points:
                    continue
                if len(points) == 1 and budget.get(task):  # evaluated once: a level line
                    (value,) = points.values()
                    ax.axhline(statistics.fmean(value), ls="--", lw=1, label=column.label,
                               color="gray")  # fmt: skip
                    continue
                xs = sorted(points)
                mean = [statistics.fmean(points[x]) for x in xs]
                std = [statistics.stdev(points[x]) if len(points[x]) > 1 else 0.0 for x in xs]
                color = colors[study.columns.index(column) % len(colors)]
                ax.plot(xs, mean, marker="o", markersize=3, label=column.label, color=color)
                lo = [m - d for m, d in zip(mean, std, strict=True)]
                hi = [m + d for m, d in zip(mean, std, strict=True)]
                ax.fill_between(xs, lo, hi, color=color, alpha=0.15)
            ax.set_title(f"{report.task_label(task)}: {title.split(' (')[0]}", fontsize=9)
            ax.set_xlabel("samples drawn")
            ax.set_ylabel("test accuracy (%)")
            ax.set_ylim(-2, 102)
            ax.grid(alpha=0.3)
            if ti == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.fspath(path))


def write_outputs(study: Study, plot_name: str = "study.png") -> dict[str, str]:
    """``results.md``, ``runs.csv`` and the plot under the root; returns their paths."""
    root = as_path(study.root_dir)
    rows = curves(study)
    if not rows:
        raise sweep.SweepError(f"{study.root_dir}: no trial has written metrics yet")
    paths = {
        "markdown": os.fspath(root / "results.md"),
        "csv": os.fspath(root / "runs.csv"),
        "plot": os.fspath(root / plot_name),
    }
    as_path(paths["markdown"]).write_text(tables(study))
    as_path(paths["csv"]).write_text(to_csv(rows))
    plot(study, rows, paths["plot"])
    return paths

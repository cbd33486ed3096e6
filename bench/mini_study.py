"""The paper's comparison in miniature, on CPU: every method and HIR's ablations on the
synthetic colour tasks (tasks/synthetic.py: 3, 5 and 7 options), from one format-only
warm-up per (task, seed), with the same sampling budget per round (K outputs per training
question; gin_configs/experiments/mini_study.gin), 3 seeds.

    python bench/mini_study.py [--root_dir /tmp/hir_mini_study] [--seeds 0 1 2]
        [--tasks three five seven] [--columns zero_shot ppo ...] [--only 'hir-*']
        [--one_table] [--plot_name mini_study.png] [--subprocess] [--report_only]

Writes ROOT/results.md (the tables), ROOT/runs.csv (every evaluation of every run) and
ROOT/mini_study.png (test accuracy against samples drawn). Re-running the same command
skips finished runs (hir_jax.sweep), so an interrupted study continues.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HIR_JAX_PROGRESS", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hir_jax import study as study_lib  # noqa: E402
from hir_jax import sweep  # noqa: E402
from tasks import synthetic  # noqa: E402


def build(args: argparse.Namespace) -> study_lib.Study:
    tasks = tuple(f"{synthetic.TASK_PREFIX}color_pick_{t}" for t in args.tasks)
    warmups = {t: t.replace("color_pick_", "color_guess_") for t in tasks}
    unknown = [c for c in args.columns if c not in study_lib.COLUMNS]
    if unknown:
        raise SystemExit(f"error: unknown columns {unknown}; known: {list(study_lib.COLUMNS)}")
    return study_lib.Study(
        root_dir=args.root_dir,
        tasks=tasks,
        warmup_tasks=warmups,
        columns=tuple(study_lib.COLUMNS[c] for c in args.columns),
        seeds=tuple(args.seeds),
        bindings=tuple(args.binding),
        grouped=not args.one_table,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root_dir", default="/tmp/hir_mini_study")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--tasks", nargs="+", default=list(synthetic.LEVELS), choices=synthetic.LEVELS)
    ap.add_argument("--columns", nargs="+", default=list(study_lib.COLUMNS))
    ap.add_argument("--only", action="append", default=[], help="glob over trial names")
    ap.add_argument("--binding", action="append", default=[], help="extra gin NAME=VALUE")
    ap.add_argument("--one_table", action="store_true", help="every column in one table")
    ap.add_argument("--plot_name", default="mini_study.png")
    ap.add_argument("--subprocess", action="store_true", help="one run.py process per run")
    ap.add_argument("--report_only", action="store_true", help="only write tables and plot")
    args = ap.parse_args(argv)
    study = build(args)
    try:
        if args.report_only:
            paths = study_lib.write_outputs(study, plot_name=args.plot_name)
        else:
            runner = sweep.subprocess.run if args.subprocess else study_lib.in_process
            if not args.subprocess:
                study_lib.enable_compilation_cache()
            paths = study_lib.run_study(
                study, only=args.only, runner=runner, plot_name=args.plot_name
            )
    except sweep.SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(open(paths["markdown"]).read(), end="")
    print(f"tables: {paths['markdown']}  runs: {paths['csv']}  plot: {paths['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

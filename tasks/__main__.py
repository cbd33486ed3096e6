"""Command line: list the BigBench tasks and print formatted examples.

    python -m tasks --list                  # the paper's 12 and the synthetic tasks, sizes
    python -m tasks --list --all            # every BigBench JSON task found
    python -m tasks --show hir_bigbench.logical_deduction_three_objects --index 0 \
        [--split test] [--validation_fraction 0.1] [--bigbench_dir DIR]

Reads task files only (no TensorFlow, no network).
"""

from __future__ import annotations

import argparse
import sys

from tasks import bigbench, synthetic


def _list(args: argparse.Namespace) -> None:
    root = bigbench.bigbench_tasks_dir(args.bigbench_dir)
    print(f"# BigBench tasks under {root}")
    if args.all:
        for folder in bigbench.list_task_folders(root):
            print(bigbench.task_name(folder))
        return
    print(f"{'task':<52} {'N':>5} {'train':>6} {'test':>5}  folder")
    for short, folder in bigbench.PAPER_TASKS.items():
        sizes = bigbench.split_sizes(folder, bigbench_dir=root)
        name = bigbench.TASK_PREFIX + short
        print(f"{name:<52} {sizes['all']:>5} {sizes['train']:>6} {sizes['test']:>5}  {folder}")
    print(f"mixture: {bigbench.TASK_PREFIX}paper_12 (all 12 tasks)")
    print(f"# synthetic tasks (tasks/synthetic.py) under {synthetic.tasks_dir()}")
    for short in synthetic.task_names():
        sizes = bigbench.split_sizes(short, bigbench_dir=synthetic.tasks_dir())
        name = synthetic.TASK_PREFIX + short
        print(f"{name:<52} {sizes['all']:>5} {sizes['train']:>6} {sizes['test']:>5}")


def _show(args: argparse.Namespace) -> None:
    task = args.show
    if synthetic.is_synthetic(task):
        root, task = synthetic.tasks_dir(), synthetic.short_name(task)
    else:
        root = bigbench.bigbench_tasks_dir(args.bigbench_dir)
    examples = bigbench.load_examples(
        task, args.split, bigbench_dir=root, validation_fraction=args.validation_fraction
    )
    if not -len(examples) <= args.index < len(examples):
        raise IndexError(
            f"--index {args.index} out of range: the {args.split} split of {task} "
            f"has {len(examples)} examples"
        )
    ex = examples[args.index]
    print(f"task:       {bigbench.task_name(ex.task)}  (folder {ex.task})")
    print(f"split:      {args.split}[{args.index}] of {len(examples)}")
    print(f"example_id: {ex.example_id}  (index in task.json)")
    if ex.is_multiple_choice:
        print(f"options:    {len(ex.options)} -> valid answers {', '.join(ex.option_labels)}")
    print(f"answer:     {ex.answer!r}")
    print("----- inputs (model input) -----")
    print(ex.inputs)
    print("----- targets -----")
    print(ex.targets)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 on a task or file error)."""
    ap = argparse.ArgumentParser(prog="python -m tasks", description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--list", action="store_true", help="list the paper's 12 tasks")
    mode.add_argument("--show", metavar="TASK", help="print one formatted example of TASK")
    ap.add_argument("--all", action="store_true", help="with --list: every BigBench task")
    ap.add_argument("--index", type=int, default=0, help="example index within the split")
    ap.add_argument("--split", default="train", choices=["train", "validation", "test"])
    ap.add_argument("--validation_fraction", type=float, default=0.0)
    ap.add_argument("--bigbench_dir", default=None, help="BIG-bench checkout or task folder")
    args = ap.parse_args(argv)
    try:
        if args.list:
            _list(args)
        else:
            _show(args)
    except (bigbench.BigBenchError, ValueError, IndexError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

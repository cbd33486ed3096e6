"""Runs an HIR experiment or a baseline from gin files, T5X style.

    python run.py --gin_file=runs/hir.gin --gin_file=models/flan_t5_large.gin \
        --gin.MODEL_DIR="'/tmp/hir_ld3'" \
        --gin.TASK="'hir_bigbench.logical_deduction_three_objects'" \
        --gin.INITIAL_CHECKPOINT="'/path/to/flan-t5-large'"

``--gin_file`` (repeatable) is looked up as given, then under ``gin_configs/``;
``--gin.NAME=VALUE`` (repeatable) binds a parameter or macro. The resolved config goes
to MODEL_DIR/config.gin. Re-running the same command resumes from MODEL_DIR. Bad input
(a missing REQUIRED macro, an unknown binding or task, a setting out of range, a
checkpoint of the wrong shape, a MODEL_DIR that cannot be written) exits with status 2
and a one-line message; a run whose training diverges (a non-finite loss, gradient norm
or parameter) exits with status 3, its latest checkpoint the last finite one.

Multi-host: run the same command on every host with ``--multihost`` (TPU VM slices,
SLURM, Open MPI), or with ``--coordinator_address/--num_processes/--process_id``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from hir_jax.gin_cli import add_gin_flags, one_line, parse_gin, parse_with_bindings


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="HIR / baseline runs configured by gin",
        epilog="Bindings: --gin.MODEL_DIR=\"'/tmp/run'\" --gin.hir_jax.loop.LoopConfig.epochs=2",
    )
    add_gin_flags(ap)
    ap.add_argument("--dry_run", action="store_true", help="parse the config, print it, exit")
    mh = ap.add_argument_group(
        "multi-host",
        "one process per host, all with the same flags; on TPU VM slices, SLURM and Open MPI "
        "--multihost alone is enough, GPU hosts without a scheduler give the other three",
    )
    mh.add_argument(
        "--multihost", action="store_true", help="call jax.distributed.initialize() first"
    )
    mh.add_argument("--coordinator_address", help="host:port of process 0 (implies --multihost)")
    mh.add_argument("--num_processes", type=int, help="number of processes (hosts)")
    mh.add_argument("--process_id", type=int, help="this process's index, 0 .. num_processes-1")
    args = parse_with_bindings(ap, argv)
    if not args.gin_file:
        ap.error("give at least one --gin_file (e.g. --gin_file=runs/hir.gin)")
    manual = (args.coordinator_address, args.num_processes, args.process_id)
    if any(v is not None for v in manual):
        if any(v is None for v in manual):
            ap.error("--coordinator_address, --num_processes and --process_id go together")
        if not 0 <= args.process_id < args.num_processes:
            ap.error(f"--process_id must be in 0..{args.num_processes - 1}")
        args.multihost = True
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import gin

    from hir_jax.epochs import Diverged
    from hir_jax.preemption import Preempted
    from hir_jax.runner import run

    if args.multihost and not args.dry_run:
        from hir_jax.partitioning import initialize_distributed

        initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    try:
        parse_gin(args.gin_file, args.gin_bindings, args.gin_search_path)
    except Exception as exc:  # gin reports unknown names/files/values in many types
        required = re.search(r"(\w+)/macro\.value set to `%gin\.REQUIRED`", str(exc))
        if required:
            name = required.group(1)
            print(f"error: required macro {name} is not set (--gin.{name}=...)", file=sys.stderr)
        else:
            print(f"error: bad gin config: {one_line(exc)}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(gin.config_str())
        return 0
    try:
        final = run()
    except Preempted:
        print("preempted: state saved; run the same command again to resume", file=sys.stderr)
        return 0
    except Diverged as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("HIR_JAX_DEBUG"):
            raise
        print(f"error: {one_line(exc)} (HIR_JAX_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    acc = final.get("accuracy")
    print(f"done: final test accuracy {acc:.4f}" if acc is not None else "done")
    return 0


if __name__ == "__main__":
    sys.exit(main())

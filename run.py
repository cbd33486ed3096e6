"""Runs an HIR experiment or a baseline from gin files, T5X style.

    python run.py --gin_file=runs/hir.gin --gin_file=models/flan_t5_large.gin \
        --gin.MODEL_DIR="'/tmp/hir_ld3'" \
        --gin.TASK="'hir_bigbench.logical_deduction_three_objects'" \
        --gin.INITIAL_CHECKPOINT="'/path/to/flan-t5-large'"

``--gin_file`` (repeatable) is looked up as given, then under ``gin_configs/``;
``--gin.NAME=VALUE`` (repeatable) binds a parameter or macro. The resolved config goes
to MODEL_DIR/config.gin. Re-running the same command resumes from MODEL_DIR. Bad input
(a missing REQUIRED macro, an unknown binding or task, a checkpoint of the wrong shape)
exits with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

REPO = os.path.dirname(os.path.abspath(__file__))
GIN_DIR = os.path.join(REPO, "gin_configs")


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="HIR / baseline runs configured by gin",
        epilog="Bindings: --gin.MODEL_DIR=\"'/tmp/run'\" --gin.hir_jax.hir.LoopConfig.epochs=2",
    )
    ap.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
    ap.add_argument(
        "--gin_search_path", action="append", default=[], help="extra folders for gin files"
    )
    ap.add_argument("--dry_run", action="store_true", help="parse the config, print it, exit")
    args, rest = ap.parse_known_args(argv)
    args.gin_bindings = []
    for item in rest:
        if not item.startswith("--gin."):
            ap.error(f"unrecognized argument {item!r} (bindings look like --gin.NAME=VALUE)")
        args.gin_bindings.append(item[len("--gin.") :])
    if not args.gin_file:
        ap.error("give at least one --gin_file (e.g. --gin_file=runs/hir.gin)")
    return args


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = re.sub(r"\s*In call to configurable .*$", "", text)  # gin's context suffix
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import gin

    from hir_jax import gin_registry  # noqa: F401  (registers configurables)
    from hir_jax.hir import Preempted, run

    for path in [*args.gin_search_path, GIN_DIR, REPO]:
        gin.add_config_file_search_path(path)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)  # gin logs each search-path miss as an error
    try:
        gin.parse_config_files_and_bindings(args.gin_file, args.gin_bindings)
    except Exception as exc:  # gin reports unknown names/files/values in many types
        required = re.search(r"(\w+)/macro\.value set to `%gin\.REQUIRED`", str(exc))
        if required:
            name = required.group(1)
            print(f"error: required macro {name} is not set (--gin.{name}=...)", file=sys.stderr)
        else:
            print(f"error: bad gin config: {_one_line(exc)}", file=sys.stderr)
        return 2
    finally:
        root.setLevel(level)
    if args.dry_run:
        print(gin.config_str())
        return 0
    try:
        final = run()
    except Preempted:
        print("preempted: state saved; run the same command again to resume", file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("HIR_JAX_DEBUG"):
            raise
        print(f"error: {_one_line(exc)} (HIR_JAX_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    acc = final.get("accuracy")
    print(f"done: final test accuracy {acc:.4f}" if acc is not None else "done")
    return 0


if __name__ == "__main__":
    sys.exit(main())

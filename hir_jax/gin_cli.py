"""The gin command line shared by ``run.py`` and ``python -m hir_jax.aot``.

``--gin_file`` (repeatable, looked up as given, then under ``gin_configs/``),
``--gin_search_path`` and ``--gin.NAME=VALUE`` bindings, T5X style. Importing this module
imports neither gin nor JAX (aot must set XLA_FLAGS first).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN_DIR = os.path.join(REPO, "gin_configs")


def add_gin_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
    ap.add_argument(
        "--gin_search_path", action="append", default=[], help="extra folders for gin files"
    )


def parse_with_bindings(ap: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """``ap.parse_args`` that collects ``--gin.NAME=VALUE`` items in ``gin_bindings``."""
    args, rest = ap.parse_known_args(list(argv))
    args.gin_bindings = []
    for item in rest:
        if not item.startswith("--gin."):
            ap.error(f"unrecognized argument {item!r} (bindings look like --gin.NAME=VALUE)")
        args.gin_bindings.append(item[len("--gin.") :])
    return args


def parse_gin(
    files: Sequence[str],
    bindings: Sequence[str],
    search_paths: Sequence[str] = (),
    finalize: bool = True,
) -> None:
    """Registers our configurables and parses the gin files and bindings."""
    import gin

    from hir_jax import gin_registry  # noqa: F401  (registers configurables)

    for path in [*search_paths, GIN_DIR, REPO]:
        gin.add_config_file_search_path(path)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)  # gin logs each search-path miss as an error
    try:
        gin.parse_config_files_and_bindings(files, bindings, finalize_config=finalize)
    finally:
        root.setLevel(level)


def one_line(exc: BaseException) -> str:
    """An exception as one line, without gin's "In call to configurable ..." suffix."""
    text = " ".join(str(exc).split())
    text = re.sub(r"\s*In call to configurable .*$", "", text)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

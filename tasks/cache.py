"""Where the project caches what it builds (trained vocabularies, synthetic task files):
``$HIR_JAX_CACHE``, else ``~/.cache/hir_jax``. No SeqIO or TensorFlow here."""

from __future__ import annotations

import os

from etils import epath

CACHE_ENV_VAR = "HIR_JAX_CACHE"


def cache_dir(path: str | os.PathLike[str] | None = None) -> epath.Path:
    """``path``, else ``$HIR_JAX_CACHE``, else ``~/.cache/hir_jax``."""
    if path is not None:
        return epath.Path(path)
    env = os.environ.get(CACHE_ENV_VAR)
    return epath.Path(env) if env else epath.Path("~/.cache/hir_jax").expanduser()

"""The path layer: local and ``gs://`` paths through ``etils.epath``, never bare ``open()``.

Local paths use the OS backend (no TensorFlow import); ``gs://`` paths use
``tf.io.gfile`` (or fsspec) as chosen by ``etils.epath``. TensorStore gets a kvstore
spec from :func:`kvstore_spec` ("file" locally, "gcs" for ``gs://``).
"""

from __future__ import annotations

import errno
import json
import os
import re
from typing import Any

from etils import epath

PathLike = str | os.PathLike

_GCS_RE = re.compile(r"^gs://([^/]+)/?(.*)$", re.DOTALL)


def as_path(path: PathLike) -> epath.Path:
    """An ``epath.Path`` for a local or ``gs://`` path (``~`` expanded for local ones)."""
    if isinstance(path, epath.Path):
        return path
    text = os.fspath(path)
    if not is_gcs(text):
        text = os.path.expanduser(text)
    return epath.Path(text)


def is_gcs(path: PathLike) -> bool:
    """True for ``gs://bucket/...`` paths."""
    return os.fspath(path).startswith("gs://")


def read_json(path: PathLike) -> Any:
    """Parse a JSON file."""
    return json.loads(as_path(path).read_text())


def write_json(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON with a trailing newline."""
    as_path(path).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def kvstore_spec(path: PathLike) -> dict[str, Any]:
    """TensorStore kvstore spec for a directory: "gcs" for ``gs://``, otherwise "file"."""
    text = os.fspath(path)
    match = _GCS_RE.match(text)
    if match:
        return {"driver": "gcs", "bucket": match.group(1), "path": match.group(2)}
    return {"driver": "file", "path": os.path.abspath(os.path.expanduser(text))}


class UnwritableDirError(OSError):
    """A directory a run must write to cannot be created or written."""


def check_writable_dir(path: PathLike, what: str) -> None:
    """Checks that ``path`` can be written: an existing directory (or a ``gs://`` path)
    by writing and removing a probe file, a local one not there yet by its nearest
    existing parent (a writable directory). Creates nothing; raises
    ``UnwritableDirError`` naming ``what`` (``MODEL_DIR``), the path and the OS's reason."""
    directory = as_path(path)
    try:
        if is_gcs(path) or directory.exists():
            probe = directory / f".write_probe_{os.getpid()}_{os.urandom(4).hex()}"
            probe.write_text("")
            probe.unlink()
            return
        parent = directory.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(parent))
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(parent))
    except Exception as exc:  # OSError locally; the GCS client's own errors for gs://
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UnwritableDirError(f"{what} {path} cannot be created or written: {reason}") from exc

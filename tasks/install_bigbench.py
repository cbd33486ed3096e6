"""Install the BigBench task files (bigbench==1.0.0) into this Python environment.

``pip install --no-deps bigbench==1.0.0`` fails: the sdist declares a direct-URL
dependency (bleurt) that pip rejects while preparing metadata, even with --no-deps.
Only the package's ``benchmark_tasks/**/task.json`` files are used here, so this
downloads the sdist from the package index pip uses (``index_urls``: ``PIP_INDEX_URL``,
pip's configuration or pip's default, then the extra indexes), checks its sha256 against
the index, and extracts just those files to ``default_dir()``. Offline, ``--sdist FILE``.

    python -m tasks.install_bigbench [--sdist bigbench-1.0.0.tar.gz] [--dest DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import html.parser
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request

VERSION = "1.0.0"
SDIST = f"bigbench-{VERSION}.tar.gz"
_MARKER = ".complete"


def default_dir() -> str:
    """Where the task files live once installed: inside the active environment."""
    return os.path.join(sys.prefix, "share", "hir_jax", f"bigbench-{VERSION}")


def installed_tasks_dir(dest: str | None = None) -> str | None:
    """The installed ``benchmark_tasks`` folder, or None when not installed."""
    root = dest or default_dir()
    if os.path.exists(os.path.join(root, _MARKER)):
        return os.path.join(root, "benchmark_tasks")
    return None


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.hrefs += [v for k, v in attrs if k == "href" and v]


class IndexUnreachableError(RuntimeError):
    """No index pip is configured with lists the sdist (or none could be reached)."""


def _pip(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", *args], capture_output=True, text=True, check=False
    )
    return proc.stdout


def _pip_config_get(key: str) -> str | None:
    """The effective value of ``key`` (``global.index-url``) in pip's configuration, all
    its files merged in pip's own order (``pip config get``); None when unset."""
    value = _pip("config", "get", key).strip()
    return value or None


def _pip_default_index() -> str:
    """pip's built-in index, as ``pip install --help`` states it."""
    text = " ".join(_pip("install", "--help").split())
    match = re.search(r"--index-url <url> .*?\(default (\S+?)\)", text)
    if not match:
        raise IndexUnreachableError(
            "cannot tell which package index pip uses (set PIP_INDEX_URL, or pass --sdist FILE)"
        )
    return match.group(1)


def index_urls() -> list[str]:
    """The indexes pip would read, in its order: the index (``PIP_INDEX_URL``, else
    ``index-url`` in pip's configuration, else pip's default) and the extra indexes
    (``PIP_EXTRA_INDEX_URL``, else ``extra-index-url`` in the configuration)."""

    def setting(name: str) -> str | None:
        env = os.environ.get("PIP_" + name.upper().replace("-", "_"))
        if env:
            return env
        for section in ("install", "global"):
            value = _pip_config_get(f"{section}.{name}")
            if value:
                return value
        return None

    main = setting("index-url") or _pip_default_index()
    extra = (setting("extra-index-url") or "").split()
    return [u.rstrip("/") for u in [main, *extra]]


def _find_sdist_url() -> tuple[str, str | None]:
    """The sdist's URL and sha256 (None for a local file found in a ``file://`` index
    folder without a page) from the first index that lists it."""
    failures = []
    for index in index_urls():
        page_url = f"{index}/bigbench/"
        local = urllib.parse.urlparse(page_url)
        if local.scheme == "file" and not os.path.exists(os.path.join(local.path, "index.html")):
            path = os.path.join(local.path, SDIST)
            if os.path.exists(path):
                return f"file://{path}", None
            failures.append(f"{index}: no {SDIST}")
            continue
        if local.scheme == "file":
            page_url += "index.html"
        try:
            with urllib.request.urlopen(page_url, timeout=60) as resp:
                parser = _Links()
                parser.feed(resp.read().decode())
        except (OSError, ValueError) as exc:  # URLError, HTTPError, timeouts
            reason = getattr(exc, "reason", None) or exc
            failures.append(f"{index}: {' '.join(str(reason).split())}")
            continue
        for href in parser.hrefs:
            url = urllib.parse.urljoin(page_url, href)
            path, _, fragment = url.partition("#")
            if path.endswith("/" + SDIST) and fragment.startswith("sha256="):
                return path, fragment.removeprefix("sha256=")
        failures.append(f"{index}: {SDIST} with a sha256 not listed")
    raise IndexUnreachableError(
        f"cannot get {SDIST} from the package indexes pip uses ({'; '.join(failures)}): "
        f"download it on a machine that can and run python -m tasks.install_bigbench "
        "--sdist FILE"
    )


def _download(url: str, sha256: str | None, out_path: str) -> None:
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=600) as resp, open(out_path, "wb") as out:
        while chunk := resp.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if sha256 is not None and digest.hexdigest() != sha256:
        raise RuntimeError(f"sha256 mismatch for {url}: got {digest.hexdigest()}")


def extract_tasks(sdist_path: str, dest: str) -> int:
    """Extract ``bigbench/benchmark_tasks/**/task.json`` from the sdist; returns the count."""
    count = 0
    tasks_dir = os.path.join(dest, "benchmark_tasks")
    with tarfile.open(sdist_path, "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or parts[-1] != "task.json":
                continue
            if len(parts) < 4 or parts[1:3] != ["bigbench", "benchmark_tasks"]:
                continue
            rel = parts[3:]
            if any(p in ("", ".", "..") for p in rel):
                continue
            target = os.path.join(tasks_dir, *rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            src = tar.extractfile(member)
            assert src is not None
            with open(target, "wb") as out:
                out.write(src.read())
            count += 1
    if count == 0:
        raise RuntimeError(f"no benchmark_tasks/**/task.json in {sdist_path}")
    with open(os.path.join(dest, _MARKER), "w") as f:
        f.write(f"{count}\n")
    return count


def install(dest: str | None = None, sdist: str | None = None, force: bool = False) -> str:
    """Install the task files (idempotent); returns the ``benchmark_tasks`` folder."""
    dest = dest or default_dir()
    if not force and (done := installed_tasks_dir(dest)):
        return done
    os.makedirs(dest, exist_ok=True)
    if sdist is None:
        url, sha256 = _find_sdist_url()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, SDIST)
            print(f"downloading {url}", file=sys.stderr)
            _download(url, sha256, path)
            count = extract_tasks(path, dest)
    else:
        count = extract_tasks(sdist, dest)
    print(f"installed {count} BigBench task files under {dest}", file=sys.stderr)
    return os.path.join(dest, "benchmark_tasks")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", default=None, help=f"target folder (default {default_dir()})")
    ap.add_argument("--sdist", default=None, help="a local bigbench-1.0.0.tar.gz (offline)")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    try:
        print(install(args.dest, args.sdist, args.force))
    except IndexUnreachableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

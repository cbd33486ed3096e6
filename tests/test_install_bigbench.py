"""The BigBench installer reads the index pip is configured with (its source names no
index host), installs from a ``file://`` index, and says in one line what to do offline."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tasks import install_bigbench as ib

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def pip_env(tmp_path, monkeypatch):
    """No index from the environment; pip's configuration from a file of the test's
    (``PIP_CONFIG_FILE``, which pip reads last, over the machine's files)."""
    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.delenv(var, raising=False)
    config = tmp_path / "pip.conf"
    config.write_text("[global]\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(config))
    return config


def test_the_source_names_no_index_host():
    source = (REPO / "tasks" / "install_bigbench.py").read_text()
    assert not re.search(r"https?://", source)
    assert "pypi" not in source.lower() and "pythonhosted" not in source


def test_index_comes_from_the_environment_then_pip_config_then_pip_default(pip_env, monkeypatch):
    from pip._internal.models.index import PyPI  # pip's own default, to compare with

    assert ib.index_urls()[0] == PyPI.simple_url.rstrip("/")
    pip_env.write_text(
        "[global]\nindex-url = http://index.example/simple/\n"
        "extra-index-url =\n    http://extra.example/a\n    http://extra.example/b\n"
    )
    assert ib.index_urls() == [
        "http://index.example/simple",
        "http://extra.example/a",
        "http://extra.example/b",
    ]
    monkeypatch.setenv("PIP_INDEX_URL", "http://env.example/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "http://env-extra.example")
    assert ib.index_urls() == ["http://env.example/simple", "http://env-extra.example"]


def _fake_sdist() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = json.dumps({"name": "toy", "examples": []}).encode()
        info = tarfile.TarInfo(f"bigbench-{ib.VERSION}/bigbench/benchmark_tasks/toy/task.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_installs_from_a_file_index_and_checks_the_sha256(pip_env, tmp_path, monkeypatch):
    sdist = _fake_sdist()
    page = tmp_path / "simple" / "bigbench"
    page.mkdir(parents=True)
    (page / ib.SDIST).write_bytes(sdist)
    digest = hashlib.sha256(sdist).hexdigest()
    (page / "index.html").write_text(f'<a href="{ib.SDIST}#sha256={digest}">{ib.SDIST}</a>')
    monkeypatch.setenv("PIP_INDEX_URL", (tmp_path / "simple").as_uri())

    tasks_dir = ib.install(dest=str(tmp_path / "dest"))
    assert json.loads((Path(tasks_dir) / "toy" / "task.json").read_text())["name"] == "toy"

    (page / "index.html").write_text(f'<a href="{ib.SDIST}#sha256={"0" * 64}">x</a>')
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        ib.install(dest=str(tmp_path / "dest2"))


def test_no_route_to_the_index_says_to_use_sdist_in_one_line(pip_env, tmp_path):
    env = {
        **os.environ,
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
        "PIP_EXTRA_INDEX_URL": "http://127.0.0.1:9/extra",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.install_bigbench", "--dest", str(tmp_path / "d")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "http://127.0.0.1:9/simple: " in lines[0] and "http://127.0.0.1:9/extra: " in lines[0]
    assert lines[0].endswith("--sdist FILE")

"""Executes notebooks/hir_demo.ipynb top to bottom on CPU with the tiny model."""

import json
import os
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "hir_demo.ipynb")


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if "text" in out:
            parts.append(out["text"])
        for key in ("text/plain", "text/markdown", "text/html"):
            parts.append(out.get("data", {}).get(key, ""))
    return "".join(parts)


def test_demo_notebook_runs(tmp_path, monkeypatch):
    # The kernel inherits this environment: quick sizes, one CPU device (the tests' 8
    # simulated devices would only slow the demo down), the run written under tmp_path.
    monkeypatch.setenv("HIR_DEMO_QUICK", "1")
    monkeypatch.setenv("HIR_DEMO_MODEL_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("HIR_DEMO_CHECKPOINT", raising=False)

    # "python3" must start this interpreter (the venv's ipykernel), not another python.
    from jupyter_client.kernelspec import KernelSpecManager

    argv0 = KernelSpecManager().get_kernel_spec("python3").argv[0]
    major, minor = sys.version_info[:2]
    assert argv0 in ("python", f"python{major}", f"python{major}.{minor}", sys.executable), argv0

    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
        "commit the notebook without outputs"
    )
    client = nbclient.NotebookClient(
        nb,
        timeout=300,  # per cell
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError naming the failing cell
    elapsed = time.perf_counter() - start

    code = [c for c in nb.cells if c.cell_type == "code"]
    text = "\n".join(_text(c) for c in code)
    assert "backend cpu: 1 device(s)" in text
    assert "logical_deduction" in text and "Solve the question with correct answer." in text
    assert "final test metrics:" in text
    images = [o for c in code for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the learning curve was not displayed"
    assert "positive instruction" in text and "Solve the question with wrong answer." in text
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rounds = {json.loads(line)["round"] for line in metrics}
    assert rounds == {0, 1, 2}
    print(f"notebook executed in {elapsed:.0f} s")

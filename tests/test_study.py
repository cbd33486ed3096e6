"""A fast slice of the miniature study (hir_jax/study.py, bench/mini_study.py): one task,
two methods, one seed, two rounds, through the sweep driver and run.py in this process."""

import csv
import io

import pytest

from hir_jax import metrics_log, study


@pytest.fixture
def slice_study(tmp_path):
    task = "hir_synthetic.color_pick_three"
    return study.Study(
        root_dir=str(tmp_path / "study"),
        tasks=(task,),
        warmup_tasks={task: "hir_synthetic.color_guess_three"},
        columns=(study.COLUMNS["farl"], study.COLUMNS["hir-paper"]),
        seeds=(0,),
        bindings=("hir_jax.loop.LoopConfig.num_rounds=2",),
        warmup_epochs=4,
    )


def test_study_slice_writes_tables_csv_and_plot_and_skips_finished_runs(slice_study, monkeypatch):
    monkeypatch.setenv("HIR_JAX_PROGRESS", "0")  # (conftest has the compilation cache on)
    calls = []

    def runner(command, cwd=None, check=False):
        calls.append(command)
        return study.in_process(command, cwd, check)

    paths = study.run_study(slice_study, runner=runner, log=lambda _: None)
    assert len(calls) == 3  # the starting point, then the two trials
    start_commands = [c for c in calls if "--gin_file=runs/sft.gin" in c and any(
        "warmup_task='hir_synthetic.color_guess_three'" in a for a in c)]  # fmt: skip
    assert len(start_commands) == 1

    markdown = open(paths["markdown"]).read()
    header = next(line for line in markdown.splitlines() if line.startswith("| Task"))
    assert header == "| Task | FARL | HIR (paper) |", markdown
    row = next(line for line in markdown.splitlines() if line.startswith("| color_pick (3)"))
    assert len(row.split("|")) == 5

    rows = list(csv.DictReader(io.StringIO(open(paths["csv"]).read())))
    assert sorted({(r["column"], r["round"]) for r in rows}) == [
        (c, str(k)) for c in ("FARL", "HIR (paper)") for k in range(3)
    ]
    # Both trials start from the same checkpoint: the same round-0 accuracy.
    first = {r["column"]: float(r["accuracy"]) for r in rows if r["round"] == "0"}
    assert first["FARL"] == first["HIR (paper)"]
    # Samples drawn: N_train x K per round (120 x 4 with experiments/mini_study.gin).
    assert {r["samples_drawn"] for r in rows if r["round"] == "2"} == {"960"}
    with open(paths["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    for trial in study.trials(slice_study):
        info = metrics_log.read_run_info(trial.model_dir)
        assert info["task"] == "hir_synthetic.color_pick_three"
        assert metrics_log.is_done(trial.model_dir)
    assert metrics_log.read_run_info(study.trials(slice_study)[1].model_dir)["variant"] == "paper"

    calls.clear()
    study.run_study(slice_study, runner=runner, log=lambda _: None)
    assert calls == []  # every run is DONE: re-running only rewrites the outputs

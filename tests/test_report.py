"""hir_jax.report: the paper-shaped table from hand-written run directories."""

import csv
import io
import statistics

import pytest

from hir_jax import metrics_log as ml
from hir_jax import report

TSO3 = "hir_bigbench.tracking_shuffled_objects_three_objects"
DATE = "hir_bigbench.date_understanding"


def make_run(root, name, task, method, seed, accuracies, *, done=True, variant=None):
    """A run directory whose test accuracy per round is ``accuracies`` (fractions)."""
    run = root / name
    extra = {"variant": variant} if variant else {}
    ml.write_run_info(run, task=task, method=method, seed=seed, model="flan_t5_tiny", **extra)
    lines = []
    for rnd, acc in enumerate(accuracies):
        lines.append({"round": rnd, "step": 10 * rnd, "split": "train", "time": 0.0, "loss": 1.0})
        lines.append(
            {"round": rnd, "step": 10 * rnd, "split": "test", "time": 0.0, "accuracy": acc}
        )
    (run / ml.METRICS_FILE).write_text("".join(ml.json.dumps(x) + "\n" for x in lines))
    if done:
        ml.mark_done(run)
    return run


@pytest.fixture
def sweep_root(tmp_path):
    root = tmp_path / "sweep"
    # HIR: two seeds on two tasks; last rounds 0.9 / 0.7 (TSO3) and 0.5 / 0.6 (date);
    # best rounds 0.95 / 0.7 and 0.5 / 0.6.
    make_run(root, "hir-tso3-seed0", TSO3, "hir", 0, [0.3, 0.95, 0.9])
    make_run(root, "hir-tso3-seed1", TSO3, "hir", 1, [0.3, 0.6, 0.7])
    make_run(root, "hir-date-seed0", DATE, "hir", 0, [0.2, 0.5])
    make_run(root, "hir-date-seed1", DATE, "hir", 1, [0.1, 0.6])
    # No training: one seed each, a single round.
    make_run(root, "zero_shot-tso3-seed0", TSO3, "zero_shot", 0, [0.293])
    make_run(root, "zero_shot-date-seed0", DATE, "zero_shot", 0, [0.351])
    # FARL: only TSO3, still running.
    make_run(root, "farl-tso3-seed0", TSO3, "farl", 0, [0.3, 0.8], done=False)
    return root


def test_table_last_round_mean_std_and_average(sweep_root):
    runs, notes = report.collect_runs([sweep_root])
    assert notes == [] and len(runs) == 7
    table = report.build_table(runs)
    assert table.tasks == [TSO3, DATE]  # the paper's order
    assert table.columns == [("zero_shot", None), ("farl", None), ("hir", None)]
    hir_tso3 = table.cells[(TSO3, ("hir", None))]
    assert hir_tso3.mean == pytest.approx(80.0)
    assert hir_tso3.std == pytest.approx(statistics.stdev([90.0, 70.0]))
    assert table.cells[(DATE, ("hir", None))].mean == pytest.approx(55.0)
    avg = table.averages[("hir", None)]
    assert avg.mean == pytest.approx((80.0 + 55.0) / 2) and avg.n_tasks == 2
    # std over seeds of the per-seed averages: seed 0 (90+50)/2, seed 1 (70+60)/2
    assert avg.std == pytest.approx(statistics.stdev([70.0, 65.0]))
    assert table.averages[("zero_shot", None)].mean == pytest.approx((29.3 + 35.1) / 2)
    assert table.averages[("zero_shot", None)].std is None

    md = report.to_markdown(table)
    assert md.startswith("Test accuracy (%), last round; mean ± std over n seeds.")
    assert "| Task | No training | FARL | HIR |" in md
    assert "| tracking_shuffled_objects (3) | 29.3 (n=1) | 80.0 (n=1)* | 80.0 ± 14.1 (n=2) |" in md
    assert "| date_understanding | 35.1 (n=1) | — | 55.0 ± 7.1 (n=2) |" in md
    assert "| **Average** | 32.2 | 80.0 (1/2 tasks) | 67.5 ± 3.5 |" in md
    assert "no DONE marker" in md


def test_best_round(sweep_root):
    table = report.build_table(report.collect_runs([sweep_root], best=True)[0], best=True)
    assert table.cells[(TSO3, ("hir", None))].mean == pytest.approx((95.0 + 70.0) / 2)
    assert "best round" in report.to_markdown(table)


def test_csv(sweep_root, tmp_path):
    out = tmp_path / "out" / "table.csv"
    md_out = tmp_path / "out" / "table.md"
    assert report.main([str(sweep_root), "--csv", str(out), "--markdown", str(md_out)]) == 0
    rows = list(csv.reader(io.StringIO(out.read_text())))
    assert rows[0][:4] == ["task", "zero_shot", "zero_shot std", "zero_shot n"]
    assert rows[0][-3:] == ["hir", "hir std", "hir n"]
    by_task = {r[0]: dict(zip(rows[0], r, strict=True)) for r in rows[1:]}
    assert float(by_task[TSO3]["hir"]) == pytest.approx(80.0)
    assert float(by_task[TSO3]["hir std"]) == pytest.approx(statistics.stdev([90, 70]), abs=1e-4)
    assert by_task[TSO3]["hir n"] == "2"
    assert by_task[DATE]["farl"] == "" and by_task[TSO3]["zero_shot std"] == ""
    assert float(by_task["Average"]["hir"]) == pytest.approx(67.5)
    assert md_out.read_text().startswith("Test accuracy")


def test_single_seed_caption_globs_and_paper_columns(tmp_path, capsys):
    make_run(tmp_path, "hir-a", TSO3, "hir", 0, [0.2, 1.0])
    make_run(tmp_path, "zero_shot-a", TSO3, "zero_shot", 0, [0.3])
    make_run(tmp_path, "hir-b", DATE, "hir", 0, [0.98], variant="k4")
    assert report.main([str(tmp_path / "*-a"), "--paper"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Test accuracy (%), last round; 1 seed.")
    assert "| Task | No training | HIR | No training (paper) | PPO (paper) |" in out
    assert "| tracking_shuffled_objects (3) | 30.0 | 100.0 | 29.3 | 35.0 | 90.0 | 100.0 |" in out
    assert "| **Average** | 30.0 | 100.0 | 26.8† | 34.7† | 56.1† | 67.3† |" in out
    # Our PPO and GRPO runs sit beside the paper's PPO column.
    make_run(tmp_path, "ppo-a", TSO3, "ppo", 0, [0.3, 0.4])
    make_run(tmp_path, "grpo-a", TSO3, "grpo", 0, [0.3, 0.5])
    assert report.main([str(tmp_path / "*-a"), "--paper"]) == 0
    out = capsys.readouterr().out
    assert "| Task | No training | PPO | GRPO | HIR | No training (paper) | PPO (paper) |" in out
    assert "| tracking_shuffled_objects (3) | 30.0 | 40.0 | 50.0 | 100.0 | 29.3 | 35.0 |" in out
    # A run_info variant gets its own column.
    table = report.build_table(report.collect_runs([tmp_path])[0])
    assert ("hir", "k4") in table.columns and report.column_label(("hir", "k4")) == "HIR (k4)"


def test_errors_are_clear(tmp_path, capsys):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    ml.write_run_info(empty, task=TSO3, method="hir", seed=0, model="m")
    # Named explicitly: an error naming the directory.
    assert report.main([str(empty)]) == 1
    err = capsys.readouterr().err
    assert str(empty) in err and "no metrics.jsonl" in err
    # Found by walking a root next to a good run: skipped with a note.
    make_run(tmp_path, "hir-ok", TSO3, "hir", 1, [0.5])
    table, _, notes = report.report([tmp_path])
    assert len(table.cells) == 1 and "no metrics.jsonl" in notes[0]
    # No test accuracy yet.
    (empty / ml.METRICS_FILE).write_text('{"round": 0, "step": 0, "split": "train", "loss": 1}\n')
    with pytest.raises(report.ReportError, match="no 'accuracy' on split 'test'"):
        report.load_run(empty)
    # Not a run and nothing under it; a glob with no match; duplicate seeds.
    (tmp_path / "nothing").mkdir()
    with pytest.raises(report.ReportError, match="no run directories under it"):
        report.collect_runs([tmp_path / "nothing"])
    with pytest.raises(report.ReportError, match="no directory matches"):
        report.collect_runs([str(tmp_path / "zzz*")])
    make_run(tmp_path, "hir-dup", TSO3, "hir", 1, [0.6])
    with pytest.raises(report.ReportError, match="two runs of"):
        report.build_table(report.collect_runs([tmp_path])[0])

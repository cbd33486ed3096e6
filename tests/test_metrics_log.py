"""hir_jax.metrics_log: metrics.jsonl round trip and resume, TensorBoard files, the plot,
run_info / DONE, progress bars."""

import json
import os

import numpy as np
import pytest

from hir_jax import metrics_log as ml


def lines(model_dir):
    return (model_dir / ml.METRICS_FILE).read_text().splitlines()


def writer(model_dir, **kw):
    kw.setdefault("tensorboard", False)
    kw.setdefault("console", False)
    return ml.MetricsWriter(model_dir, **kw)


def fill(w, rounds=3, steps_per_round=10):
    for r in range(rounds):
        if r > 0:
            for s in (r * steps_per_round - 5, r * steps_per_round):
                w.write(r, s, "train", {"loss": 1.0 / (s + 1), "nll": 0.5, "entropy": 2.0})
            w.write(r, r * steps_per_round, "train", {"sampled_correct_rate": 0.1 * r})
        w.write(r, r * steps_per_round, "test", {"accuracy": 0.2 * r, "format_error_rate": 0.0})


def test_round_trip_and_value_types(tmp_path, capsys):
    w = writer(tmp_path, console=True)
    record = w.write(
        2,
        np.int64(40),
        "test",
        {"accuracy": np.float32(0.5), "n": np.int32(3), "tokens_per_s": 12345.6},
        time=123.0,
    )
    assert record == {
        "round": 2,
        "step": 40,
        "split": "test",
        "time": 123.0,
        "accuracy": 0.5,
        "n": 3,
        "tokens_per_s": 12345.6,
    }
    assert ml.read_metrics(tmp_path) == [record]
    assert json.loads(lines(tmp_path)[0]) == record
    out = capsys.readouterr().out
    assert "round 2 step 40 test" in out and "accuracy 50.0%" in out and "12,346" in out
    with pytest.raises(ValueError, match="key field"):
        w.write(0, 0, "test", {"round": 1})


def test_resume_merges_and_truncates_without_duplicates(tmp_path):
    w = writer(tmp_path)
    fill(w)
    n = len(lines(tmp_path))
    ml.mark_done(tmp_path)

    # A restarted process sees what is there; redoing a written key merges into its line.
    w2 = writer(tmp_path)
    assert w2.records == w.records and w2.last_round("test") == 2
    w2.write(2, 20, "test", {"accuracy": 0.4, "extra": 1.0})
    assert len(lines(tmp_path)) == n
    assert ml.read_metrics(tmp_path)[-1]["extra"] == 1.0
    assert ml.is_done(tmp_path)  # nothing was dropped

    # Resuming from the checkpoint at the end of round 1 drops round 2 (train at steps 15
    # and 20, test at 20) and DONE.
    dropped = w2.truncate_after(1)
    assert dropped == 3 and not ml.is_done(tmp_path)
    assert max(r["round"] for r in ml.read_metrics(tmp_path)) == 1
    fill_round_2 = writer(tmp_path)
    fill_round_2.write(2, 15, "train", {"loss": 0.1})
    fill_round_2.write(2, 20, "train", {"loss": 0.05})
    fill_round_2.write(2, 20, "test", {"accuracy": 0.4})
    keys = [(r["round"], r["step"], r["split"]) for r in ml.read_metrics(tmp_path)]
    assert len(keys) == len(set(keys))

    # A checkpoint inside round 2 at step 15 keeps that round's records up to step 15.
    assert fill_round_2.truncate_after(2, step=15) == 2
    last = ml.read_metrics(tmp_path)[-1]
    assert (last["round"], last["step"], last["split"]) == (2, 15, "train")
    assert fill_round_2.truncate_after(2, step=15) == 0

    # A fresh start empties the file.
    fill_round_2.reset()
    assert ml.read_metrics(tmp_path) == [] and lines(tmp_path) == []


def test_incomplete_last_line_is_dropped_and_repaired(tmp_path):
    w = writer(tmp_path)
    w.write(0, 0, "test", {"accuracy": 0.1})
    with (tmp_path / ml.METRICS_FILE).open("a") as f:
        f.write('{"round": 1, "step": 5, "spl')  # killed mid-write
    with pytest.warns(UserWarning, match="incomplete last line"):
        assert len(ml.read_metrics(tmp_path)) == 1
    with pytest.warns(UserWarning):
        w2 = writer(tmp_path)
    w2.write(1, 5, "test", {"accuracy": 0.2})
    assert [r["round"] for r in ml.read_metrics(tmp_path)] == [0, 1]
    (tmp_path / ml.METRICS_FILE).write_text('{"round": 0, "step": 0, "split": "test"}\nbad\n{}\n')
    with pytest.raises(ValueError, match=":2: not a metrics record"):
        ml.read_metrics(tmp_path)


def test_missing_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        ml.read_metrics(tmp_path)
    assert ml.read_metrics(tmp_path, missing_ok=True) == []


def test_tensorboard_event_files_follow_truncation(tmp_path):
    from tensorflow.core.util import event_pb2
    from tensorflow.python.lib.io import tf_record

    def scalars(split):
        files = sorted((tmp_path / "tensorboard" / split).glob("events.out.tfevents.*"))
        assert files, f"no event file for {split}"
        out = []
        for path in files:
            for raw in tf_record.tf_record_iterator(os.fspath(path)):
                event = event_pb2.Event.FromString(raw)
                for value in event.summary.value:
                    assert value.metadata.plugin_data.plugin_name == "scalars"
                    number = np.frombuffer(value.tensor.tensor_content, np.float32)[0]
                    out.append((value.tag, event.step, round(float(number), 4)))
        return out

    w = writer(tmp_path, tensorboard=True)
    fill(w)
    w.flush()
    test = scalars("test")
    assert ("accuracy", 20, 0.4) in test and ("accuracy", 0, 0.0) in test
    assert ("loss", 5, round(1 / 6, 4)) in scalars("train")
    w.truncate_after(1)
    assert ("accuracy", 20, 0.4) not in scalars("test")
    assert ("accuracy", 10, 0.2) in scalars("test")
    w.close()


def test_plot_is_a_png(tmp_path):
    import matplotlib.image

    ml.write_run_info(tmp_path, task="hir_bigbench.x", method="hir", seed=0, model="tiny")
    fill(writer(tmp_path))
    path = ml.plot_learning_curve(tmp_path)
    assert path == tmp_path / ml.PLOT_FILE
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(os.fspath(path))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    # An empty run (no metrics yet) still gives a plot.
    empty = tmp_path / "empty"
    assert ml.plot_learning_curve(empty).read_bytes()[:4] == b"\x89PNG"


def test_run_info_and_done(tmp_path):
    run = tmp_path / "run"
    ml.write_run_info(run, task="t", method="sft", seed=np.int64(3), model="m", num_rounds=5)
    assert ml.read_run_info(run) == {
        "task": "t",
        "method": "sft",
        "seed": 3,
        "model": "m",
        "num_rounds": 5,
    }
    assert not ml.is_done(run)
    ml.mark_done(run, rounds=5)
    assert ml.is_done(run) and json.loads((run / "DONE").read_text())["rounds"] == 5
    ml.clear_done(run)
    assert not ml.is_done(run)
    with pytest.raises(FileNotFoundError, match="run_info.json"):
        ml.read_run_info(tmp_path)


def test_progress_switches(monkeypatch):
    assert list(ml.progress(range(3), disable=True)) == [0, 1, 2]
    try:
        ml.set_progress_enabled(False)
        assert ml.progress(total=3).disable
        ml.set_progress_enabled(None)
        monkeypatch.setenv(ml.PROGRESS_ENV, "0")
        assert ml.progress_enabled() is False and ml.progress(total=3).disable
        monkeypatch.setenv(ml.PROGRESS_ENV, "1")
        assert ml.progress_enabled() is True
        monkeypatch.delenv(ml.PROGRESS_ENV)
        assert ml.progress_enabled() is None
    finally:
        ml.set_progress_enabled(None)


def test_inactive_writer_writes_nothing_but_keeps_records(tmp_path, capsys):
    w = writer(tmp_path / "run", active=False)
    w.write(0, 0, "test", {"accuracy": 1.0})
    w.write(0, 0, "test", {"loss": 2.0})
    w.write(1, 5, "test", {"accuracy": 0.5})
    assert not (tmp_path / "run").exists()
    assert capsys.readouterr().out == ""
    assert [(r["round"], r.get("accuracy"), r.get("loss")) for r in w.records] == [
        (0, 1.0, 2.0),
        (1, 0.5, None),
    ]
    assert w.truncate_after(0) == 1 and w.last_round() == 0
    assert not (tmp_path / "run").exists()

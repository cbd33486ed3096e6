"""What a user sees of a run: metrics.jsonl, TensorBoard scalars, console lines, progress
bars, the learning-curve PNG and the run_info.json / DONE markers.

(Named ``metrics_log`` rather than ``logging`` so that it never shadows the standard
library module.)

Files in MODEL_DIR (local or ``gs://``; all I/O goes through ``etils.epath`` or
``tf.io.gfile``, never bare ``open()``):

* ``metrics.jsonl``: one JSON object per line, ``{"round": int, "step": int, "split":
  "train"|"valid"|"test", "time": unix seconds, <metric>: number, ...}``. Fractions
  (``accuracy``, ``*_rate``, ``token_accuracy``) are stored as 0..1. The key of a record is
  ``(round, step, split)``: writing a key that already exists merges the new metrics into
  that line instead of adding a second one.
* ``tensorboard/<split>/events.out.tfevents.*``: one scalar per metric, TensorBoard step =
  the record's ``step`` (or ``round``, see ``MetricsWriter(tb_step=...)``).
* ``run_info.json``: ``{"task", "method", "seed", "model", ...}``, read by ``hir_jax.report``.
* ``learning_curve.png``: :func:`plot_learning_curve`.
* ``DONE``: written last (:func:`mark_done`) when the run finished all its rounds; the
  sweep driver skips trials that have it.

Resuming: a restarted run that redoes work after its last checkpoint calls
``MetricsWriter.truncate_after(round, step)`` (or ``reset(records)`` with the metrics
saved in the checkpoint) once after restoring; the lines written after that checkpoint are
dropped and the TensorBoard files are rebuilt from what is kept, so neither shows the
redone rounds twice. A fresh start (no checkpoint) calls ``reset()``.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time as time_lib
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import tqdm
from etils import epath

from hir_jax.paths import PathLike, as_path

METRICS_FILE = "metrics.jsonl"
RUN_INFO_FILE = "run_info.json"
DONE_FILE = "DONE"
PLOT_FILE = "learning_curve.png"
TENSORBOARD_DIR = "tensorboard"

KEY_FIELDS = ("round", "step", "split")
RESERVED_FIELDS = (*KEY_FIELDS, "time")
# Metrics stored as fractions 0..1 and shown as percentages.
FRACTION_METRICS = frozenset(
    {
        "accuracy",
        "sampled_correct_rate",
        "format_error_rate",
        "sampled_format_error_rate",
        "token_accuracy",
    }
)
LOSS_TERMS = ("loss", "nll", "contrastive", "entropy")

# Environment switch for progress bars: "0" off, "1" on, unset -> on when stderr is a TTY.
PROGRESS_ENV = "HIR_JAX_PROGRESS"
_progress_enabled: bool | None = None


def is_fraction_metric(name: str) -> bool:
    """True for metrics stored as 0..1 and shown as % (accuracy, ``*_rate``, ...)."""
    return name in FRACTION_METRICS or name.endswith("_rate") or name.endswith("accuracy")


# ---------------------------------------------------------------------------------------
# run_info.json and DONE
# ---------------------------------------------------------------------------------------


def write_run_info(
    model_dir: PathLike, *, task: str, method: str, seed: int, model: str, **extra: Any
) -> None:
    """Write ``run_info.json``: what the report needs to place a run in its table.

    ``extra`` is stored as well (JSON-serialisable values, e.g. ``num_rounds``,
    ``checkpoint``); a ``variant`` string, if given, makes the report show the run in its
    own column ("HIR (k4)") instead of averaging it with the plain method's seeds.
    """
    info = {"task": task, "method": method, "seed": int(seed), "model": model}
    info.update({k: _jsonable(v) for k, v in extra.items()})
    directory = as_path(model_dir)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / RUN_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def read_run_info(model_dir: PathLike) -> dict[str, Any]:
    """Parse ``run_info.json``; FileNotFoundError with the path if there is none."""
    path = as_path(model_dir) / RUN_INFO_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no {RUN_INFO_FILE} (not a run directory?)")
    return json.loads(path.read_text())


def mark_done(model_dir: PathLike, **info: Any) -> None:
    """Write the ``DONE`` marker (JSON: time and ``info``). Call it last, after the final
    checkpoint, metrics and plot are written: the sweep driver skips runs that have it."""
    payload = {"time": time_lib.time(), **{k: _jsonable(v) for k, v in info.items()}}
    (as_path(model_dir) / DONE_FILE).write_text(json.dumps(payload, sort_keys=True) + "\n")


def is_done(model_dir: PathLike) -> bool:
    """True when the run in ``model_dir`` finished all its rounds (``DONE`` exists)."""
    return (as_path(model_dir) / DONE_FILE).exists()


def clear_done(model_dir: PathLike) -> None:
    """Remove the ``DONE`` marker if present (the run is being redone)."""
    path = as_path(model_dir) / DONE_FILE
    if path.exists():
        path.unlink()


# ---------------------------------------------------------------------------------------
# metrics.jsonl
# ---------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Python scalars/containers for JSON (NumPy and JAX scalars via ``.item()``)."""
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "size", 1) == 1:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as a metric value")


def _key(record: Mapping[str, Any]) -> tuple[int, int, str]:
    return (int(record["round"]), int(record["step"]), str(record["split"]))


def _parse_lines(text: str, where: str) -> tuple[list[dict[str, Any]], bool]:
    """Records of a metrics.jsonl text, and whether the file needs a clean rewrite.

    A broken last line (a run killed mid-write) is dropped with a warning; a broken line
    elsewhere is an error.
    """
    lines = text.split("\n")
    records: list[dict[str, Any]] = []
    dirty = bool(text) and not text.endswith("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            _key(record)
        except (ValueError, KeyError, TypeError) as e:
            is_last = all(not rest.strip() for rest in lines[number:])
            if is_last:
                warnings.warn(
                    f"{where}:{number}: dropping an incomplete last line ({e})", stacklevel=3
                )
                dirty = True
                continue
            raise ValueError(f"{where}:{number}: not a metrics record: {line[:200]!r}") from e
        records.append(record)
    return records, dirty


def read_metrics(model_dir: PathLike, *, missing_ok: bool = False) -> list[dict[str, Any]]:
    """All records of ``MODEL_DIR/metrics.jsonl`` in file order.

    Raises FileNotFoundError naming the directory when there is no metrics file (unless
    ``missing_ok``, which returns ``[]``).
    """
    path = as_path(model_dir) / METRICS_FILE
    if not path.exists():
        if missing_ok:
            return []
        raise FileNotFoundError(
            f"{as_path(model_dir)}: no {METRICS_FILE} (not a run directory, or the run has "
            "not written metrics yet)"
        )
    records, _ = _parse_lines(path.read_text(), os.fspath(path))
    return records


def select(
    records: Iterable[Mapping[str, Any]], split: str, metric: str
) -> list[tuple[int, int, float]]:
    """``(round, step, value)`` of one metric on one split, sorted by (round, step)."""
    out = [
        (int(r["round"]), int(r["step"]), float(r[metric]))
        for r in records
        if r.get("split") == split and isinstance(r.get(metric), int | float)
    ]
    return sorted(out, key=lambda t: (t[0], t[1]))


def format_metrics(record: Mapping[str, Any]) -> str:
    """One console line: ``round 3 step 1200 test | accuracy 45.3% | loss 1.234``."""
    head = f"round {record['round']} step {record['step']} {record['split']}"
    parts = [head]
    for name, value in record.items():
        if name in RESERVED_FIELDS:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            parts.append(f"{name} {value}")
        elif is_fraction_metric(name):
            parts.append(f"{name} {100 * value:.1f}%")
        elif isinstance(value, int):
            parts.append(f"{name} {value}")
        elif math.isfinite(value) and abs(value) >= 1000:
            parts.append(f"{name} {value:,.0f}")
        else:
            parts.append(f"{name} {value:.4g}")
    return " | ".join(parts)


class MetricsWriter:
    """Appends metric records to ``metrics.jsonl``, TensorBoard and the console.

    Construct once per run process (it reads any existing ``metrics.jsonl``, so a resumed
    run continues the same file). ``active=False`` (non-chief hosts of a multi-host job)
    keeps the records in memory only: no file, TensorBoard or console output.
    ``tb_step`` picks the TensorBoard x axis: "step" (the record's step, default) or
    "round".
    """

    def __init__(
        self,
        model_dir: PathLike,
        *,
        tensorboard: bool = True,
        console: bool = True,
        active: bool = True,
        tb_step: str = "step",
    ) -> None:
        if tb_step not in ("step", "round"):
            raise ValueError(f"tb_step must be 'step' or 'round', got {tb_step!r}")
        self.model_dir = as_path(model_dir)
        self.path = self.model_dir / METRICS_FILE
        self.tensorboard = tensorboard
        self.console = console
        self.active = active
        self.tb_step = tb_step
        self._tb_writers: dict[str, Any] = {}
        self._records: list[dict[str, Any]] = []
        self._index: dict[tuple[int, int, str], int] = {}
        if self.path.exists():
            records, dirty = _parse_lines(self.path.read_text(), os.fspath(self.path))
            self._set_records(records)
            if dirty and active:
                self._rewrite()
        if active:
            self.model_dir.mkdir(parents=True, exist_ok=True)

    # -- reading ------------------------------------------------------------------------

    @property
    def records(self) -> list[dict[str, Any]]:
        """A copy of all records so far (file order)."""
        return [dict(r) for r in self._records]

    def last_round(self, split: str | None = None) -> int | None:
        """The highest round written (on ``split`` if given), or None."""
        rounds = [int(r["round"]) for r in self._records if split in (None, r["split"])]
        return max(rounds) if rounds else None

    # -- writing ------------------------------------------------------------------------

    def write(
        self,
        round: int,
        step: int,
        split: str,
        metrics: Mapping[str, Any],
        *,
        time: float | None = None,
    ) -> dict[str, Any]:
        """Record ``metrics`` for (round, step, split); returns the stored record.

        Values may be Python, NumPy or JAX scalars. ``time`` defaults to now (unix
        seconds). If (round, step, split) was written before, the new metrics are merged
        into that line (so a redone round never gives a duplicate line).
        """
        for name in KEY_FIELDS:
            if name in metrics:
                raise ValueError(f"{name!r} is a key field; pass it as an argument")
        record: dict[str, Any] = {"round": int(round), "step": int(step), "split": str(split)}
        record["time"] = float(time) if time is not None else time_lib.time()
        record.update({str(k): _jsonable(v) for k, v in metrics.items()})
        if self.active:
            if self.console:
                tqdm.tqdm.write(format_metrics(record), file=sys.stdout)
            self._write_tensorboard([record])  # only the new values, also when merging
        key = _key(record)
        if key in self._index:
            stored = self._records[self._index[key]]
            stored.update(record)
            if self.active:
                self._rewrite()
        else:
            stored = dict(record)
            self._index[key] = len(self._records)
            self._records.append(stored)
            if self.active:
                self._append(stored)
        return dict(stored)

    def truncate_after(self, round: int, step: int | None = None) -> int:
        """Drop records after a checkpoint; returns how many were dropped.

        Keeps records with ``record.round < round``, and those of ``round`` itself when
        ``step`` is None (a checkpoint taken at the end of the round) or
        ``record.step <= step`` (a checkpoint taken at ``step`` inside the round). Call it
        once after restoring a checkpoint; ``truncate_after(-1)`` drops everything.
        """

        def keep(r: Mapping[str, Any]) -> bool:
            if int(r["round"]) != round:
                return int(r["round"]) < round
            return step is None or int(r["step"]) <= step

        kept = [r for r in self._records if keep(r)]
        dropped = len(self._records) - len(kept)
        if dropped:
            self.reset(kept)
        return dropped

    def reset(self, records: Sequence[Mapping[str, Any]] = ()) -> None:
        """Replace the whole file with ``records`` (e.g. the metrics saved in a checkpoint;
        empty for a fresh start), rebuild the TensorBoard files from them and remove a
        stale ``DONE`` marker."""
        self._set_records([dict(r) for r in records])
        if not self.active:
            return
        self._rewrite()
        if self.tensorboard:
            self._rebuild_tensorboard()
        clear_done(self.model_dir)

    def flush(self) -> None:
        """Flush the TensorBoard writers (metrics.jsonl is written line by line)."""
        for writer in self._tb_writers.values():
            writer.flush()

    def close(self) -> None:
        """Flush and close the TensorBoard writers."""
        for writer in self._tb_writers.values():
            writer.close()
        self._tb_writers.clear()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------

    def _set_records(self, records: list[dict[str, Any]]) -> None:
        self._records, self._index = [], {}
        for record in records:
            key = _key(record)
            if key in self._index:  # an older file with duplicate keys: merge them
                self._records[self._index[key]].update(record)
            else:
                self._index[key] = len(self._records)
                self._records.append(record)

    def _append(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(record) + "\n"
        if os.fspath(self.path).startswith("gs://"):
            # Cloud objects cannot be appended to: rewrite the (small) file.
            self._rewrite()
            return
        with self.path.open("a") as f:
            f.write(line)
            f.flush()

    def _rewrite(self) -> None:
        text = "".join(json.dumps(r) + "\n" for r in self._records)
        if os.fspath(self.path).startswith("gs://"):
            self.path.write_text(text)
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(self.path)  # atomic: a crash leaves the old or the new file

    def _tb_writer(self, split: str) -> Any:
        if split not in self._tb_writers:
            tf = _import_tf()
            logdir = os.fspath(self.model_dir / TENSORBOARD_DIR / split)
            self._tb_writers[split] = tf.summary.create_file_writer(logdir)
        return self._tb_writers[split]

    def _write_tensorboard(self, records: Iterable[Mapping[str, Any]]) -> None:
        records = list(records)
        if not self.tensorboard or not records:
            return
        tf = _import_tf()
        from tensorflow.core.framework import summary_pb2

        # tf.summary.scalar needs the tensorboard package; a tensor summary with the
        # "scalars" plugin tag is the same event, written by TensorFlow alone.
        metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
        )
        touched = set()
        for record in records:
            writer = self._tb_writer(record["split"])
            touched.add(record["split"])
            tb_step = int(record[self.tb_step])
            with writer.as_default():
                for name, value in record.items():
                    if name in RESERVED_FIELDS or isinstance(value, bool):
                        continue
                    if isinstance(value, int | float):
                        tensor = tf.constant(value, tf.float32)
                        tf.summary.write(name, tensor, step=tb_step, metadata=metadata)
        for split in touched:
            self._tb_writers[split].flush()

    def _rebuild_tensorboard(self) -> None:
        self.close()
        root = self.model_dir / TENSORBOARD_DIR
        if root.exists():
            for split_dir in root.iterdir():
                if split_dir.is_dir():
                    for event_file in split_dir.glob("events.out.tfevents.*"):
                        event_file.unlink()
        self._write_tensorboard(self._records)


_tf_gpus_hidden = False


def _import_tf() -> Any:
    """TensorFlow, with its GPUs hidden on first use: JAX owns the accelerator, and TF
    would otherwise reserve GPU memory when it first initialises its devices."""
    global _tf_gpus_hidden
    import tensorflow as tf

    if not _tf_gpus_hidden:
        _tf_gpus_hidden = True
        try:
            tf.config.set_visible_devices([], "GPU")
        except (RuntimeError, ValueError):  # TF's devices were initialised elsewhere already
            pass
    return tf


# ---------------------------------------------------------------------------------------
# Progress bars and console
# ---------------------------------------------------------------------------------------


def set_progress_enabled(enabled: bool | None) -> None:
    """Turn progress bars on (True), off (False) or back to automatic (None: the
    ``HIR_JAX_PROGRESS`` environment variable if set, else on when stderr is a TTY)."""
    global _progress_enabled
    _progress_enabled = enabled


def progress_enabled() -> bool | None:
    """The current setting: True, False, or None for "when stderr is a TTY"."""
    if _progress_enabled is not None:
        return _progress_enabled
    env = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if env in ("0", "false", "no", "off"):
        return False
    if env in ("1", "true", "yes", "on"):
        return True
    return None


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str | None = None,
    unit: str = "it",
    leave: bool = False,
    disable: bool | None = None,
    **kwargs: Any,
) -> tqdm.tqdm:
    """A tqdm bar for sampling / training / evaluation loops (on stderr).

    Use as an iterable wrapper or manually (``bar.update(n)``, ``bar.set_postfix(...)``,
    ``bar.close()`` or ``with``). ``disable`` overrides the global setting
    (:func:`set_progress_enabled`); pass ``disable=True`` on non-chief hosts.
    """
    if disable is None:
        enabled = progress_enabled()
        disable = None if enabled is None else not enabled
    return tqdm.tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        leave=leave,
        disable=disable,
        dynamic_ncols=True,
        **kwargs,
    )


def console(message: str) -> None:
    """Print a line to stdout without breaking active progress bars."""
    tqdm.tqdm.write(message, file=sys.stdout)


# ---------------------------------------------------------------------------------------
# Learning curve
# ---------------------------------------------------------------------------------------


def plot_learning_curve(
    model_dir: PathLike,
    records: Sequence[Mapping[str, Any]] | None = None,
    *,
    path: PathLike | None = None,
) -> epath.Path:
    """Write the learning-curve PNG of a run and return its path.

    Left: test (and valid) accuracy and the train split's sampled-correct and
    format-error rates per round, in %. Right: the train loss terms (loss, nll,
    contrastive, entropy) per step. ``records`` default to ``metrics.jsonl``; the title
    comes from ``run_info.json`` when present. Uses the Agg canvas (no display, no pyplot
    global state). Default path: ``MODEL_DIR/learning_curve.png``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    model_dir = as_path(model_dir)
    if records is None:
        records = read_metrics(model_dir, missing_ok=True)
    try:
        info = read_run_info(model_dir)
        title = " · ".join(
            str(info[k]) for k in ("task", "method", "model") if info.get(k) is not None
        )
        if info.get("seed") is not None:
            title += f" · seed {info['seed']}"
    except (FileNotFoundError, ValueError):
        title = model_dir.name

    fig = Figure(figsize=(11, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax_acc, ax_loss = fig.subplots(1, 2)

    curves = [
        ("test", "accuracy", "test accuracy", "-", "o"),
        ("valid", "accuracy", "valid accuracy", "-", "s"),
        ("train", "sampled_correct_rate", "train sampled correct", "--", "^"),
        ("train", "sampled_format_error_rate", "train sampled format errors", ":", "x"),
        ("test", "format_error_rate", "test format errors", ":", "+"),
    ]
    drew = False
    for split, metric, label, style, marker in curves:
        points = _last_per_round(select(records, split, metric))
        if points:
            xs, ys = zip(*points, strict=True)
            ax_acc.plot(xs, [100 * y for y in ys], linestyle=style, marker=marker, label=label)
            drew = True
    ax_acc.set_xlabel("round")
    ax_acc.set_ylabel("%")
    ax_acc.set_ylim(-2, 102)
    ax_acc.set_title("accuracy")
    ax_acc.grid(alpha=0.3)
    if drew:
        ax_acc.legend(fontsize=8)
    else:
        ax_acc.text(0.5, 0.5, "no evaluation yet", ha="center", transform=ax_acc.transAxes)

    drew = False
    for name in LOSS_TERMS:
        points = select(records, "train", name)
        if points:
            steps = [p[1] for p in points]
            use_rounds = len(set(steps)) < len(steps)  # steps restart per round
            xs = [p[0] if use_rounds else p[1] for p in points]
            ax_loss.plot(
                xs, [p[2] for p in points], label=name, marker="." if len(xs) < 50 else None
            )
            ax_loss.set_xlabel("round" if use_rounds else "step")
            drew = True
    ax_loss.set_title("train loss terms")
    ax_loss.grid(alpha=0.3)
    if drew:
        ax_loss.legend(fontsize=8)
    else:
        ax_loss.text(0.5, 0.5, "no training metrics", ha="center", transform=ax_loss.transAxes)
        ax_loss.set_xlabel("step")

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    out = as_path(path) if path is not None else model_dir / PLOT_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buffer.getvalue())
    return out


def _last_per_round(points: list[tuple[int, int, float]]) -> list[tuple[int, float]]:
    """One value per round (the one with the highest step), sorted by round."""
    by_round: dict[int, float] = {}
    for rnd, _, value in points:  # sorted by (round, step): later steps win
        by_round[rnd] = value
    return sorted(by_round.items())

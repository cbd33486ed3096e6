"""Our own training checkpoints: the train state and the loop state, with orbax.

A checkpoint under ``MODEL_DIR/checkpoints/<id>`` holds two items: ``state`` (the
``TrainState`` pytree: params, optimizer state, step, rng; restored straight into its
sharded layout) and ``loop`` (JSON: round, phase, replay buffer, metrics so far, the
model's shape). Ids increase with progress: ``round * ROUND_STRIDE + step_in_round``.

Damage: after each save the chief writes ``<id>/hir_files.json`` (every file of the
checkpoint and its size). ``restore_newest`` checks a checkpoint against it before
reading it, and treats a checkpoint it cannot read whole (a file missing or of another
size, bad metadata, an array that does not decode) as damaged: it says so in one line,
moves it to ``MODEL_DIR/checkpoints_damaged/<id>`` (never deletes it) and tries the
previous one. With none intact it raises ``DamagedCheckpointError``.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp

from hir_jax.gin_cli import one_line
from hir_jax.paths import as_path, read_json, write_json

ROUND_STRIDE = 10_000_000
FILES_NAME = "hir_files.json"  # the manifest: {relative path: size in bytes}
DAMAGED_DIR = "checkpoints_damaged"


class ResumeMismatchError(ValueError):
    """MODEL_DIR holds a checkpoint of another model shape than the configured one."""


class DamagedCheckpointError(ValueError):
    """Every checkpoint in MODEL_DIR is damaged."""


def describe_id(ckpt_id: int) -> str:
    return f"{ckpt_id} (round {ckpt_id // ROUND_STRIDE}, step {ckpt_id % ROUND_STRIDE})"


def _files(directory: Any, prefix: str = "") -> dict[str, int]:
    """Every file under ``directory`` (but the manifest) and its size."""
    out = {}
    for path in sorted(directory.iterdir()):
        rel = f"{prefix}{path.name}"
        if path.is_dir():
            out.update(_files(path, f"{rel}/"))
        elif rel != FILES_NAME:
            out[rel] = path.stat().length
    return out


def checkpoint_id(round_index: int, step_in_round: int = 0) -> int:
    if not 0 <= step_in_round < ROUND_STRIDE:
        raise ValueError(f"step_in_round {step_in_round} out of range")
    return round_index * ROUND_STRIDE + step_in_round


class StateCheckpointer:
    """Saves and restores (train state, loop state) pairs under ``model_dir``."""

    def __init__(self, model_dir: str, max_to_keep: int = 2) -> None:
        self.directory = as_path(model_dir) / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self.manager = ocp.CheckpointManager(
            str(self.directory), options=options, item_names=("state", "loop")
        )

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, ckpt_id: int, state: Any, loop: dict[str, Any]) -> None:
        """Saves and waits for the write to finish (a preempted host may not get later);
        then the chief writes the checkpoint's file manifest."""
        self.manager.save(
            ckpt_id,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), loop=ocp.args.JsonSave(loop)
            ),
            force=True,
        )
        self.manager.wait_until_finished()
        if jax.process_index() == 0:
            step_dir = self.directory / str(ckpt_id)
            write_json(step_dir / FILES_NAME, _files(step_dir))

    def damage(self, ckpt_id: int) -> str | None:
        """What is wrong with checkpoint ``ckpt_id``'s files against its manifest (None:
        nothing found, or no manifest to check against)."""
        step_dir = self.directory / str(ckpt_id)
        manifest = step_dir / FILES_NAME
        if not manifest.exists():
            return None
        try:
            expected = read_json(manifest)
        except ValueError:  # cut while being written: check by reading instead
            manifest.unlink(missing_ok=True)  # another host may have dropped it first
            return None
        found = _files(step_dir)
        for rel, size in expected.items():
            if rel not in found:
                return f"{rel} is missing"
            if found[rel] != size:
                return f"{rel} is {found[rel]} bytes, {size} when written"
        return None

    def restore_newest(
        self, abstract_state: Any, check_loop: Callable[[dict[str, Any]], None]
    ) -> tuple[int, dict[str, Any], Any] | None:
        """The newest checkpoint that reads whole: ``(id, loop state, train state)``, or
        None when there is none at all. ``check_loop(saved)`` may refuse a checkpoint of
        another run (its error propagates: that is not damage). Damaged ones are reported,
        moved to ``checkpoints_damaged`` once an intact one is found, and skipped."""
        damaged: list[int] = []
        for ckpt_id in sorted(self.manager.all_steps(), reverse=True):
            problem = self.damage(ckpt_id)
            if problem is None:
                try:
                    loop = self.restore_loop(ckpt_id)
                except Exception as exc:  # JSON, TensorStore or file errors: unreadable
                    _quiet_failed_reads()
                    problem = _one_line(exc)
            if problem is None:
                check_loop(loop)
                try:
                    state = self.restore_state(ckpt_id, abstract_state)
                except Exception as exc:
                    if (self.directory / str(ckpt_id) / FILES_NAME).exists():
                        raise  # its files are as written: the run's state differs
                    _quiet_failed_reads()
                    problem = _one_line(exc)
            if problem is not None:
                _report(f"checkpoint {describe_id(ckpt_id)} in {self.directory} is damaged: "
                        f"{problem}; trying the one before it")  # fmt: skip
                damaged.append(ckpt_id)
                continue
            if damaged:
                self._move_aside(damaged)
            return ckpt_id, loop, state
        if damaged:
            steps = ", ".join(str(d) for d in damaged)
            raise DamagedCheckpointError(
                f"MODEL_DIR {self.directory.parent} has no intact checkpoint (damaged: "
                f"{steps}): move the damaged steps out of {self.directory} to start again "
                "from INITIAL_CHECKPOINT, or start afresh in another MODEL_DIR"
            )
        return None

    def _move_aside(self, ckpt_ids: list[int]) -> None:
        """Moves damaged checkpoints out of the manager's sight (kept, never deleted)."""
        if jax.process_index() == 0:
            target = self.directory.parent / DAMAGED_DIR
            target.mkdir(parents=True, exist_ok=True)
            for ckpt_id in ckpt_ids:
                dest, n = target / str(ckpt_id), 1
                while dest.exists():  # damaged again after an earlier move
                    n += 1
                    dest = target / f"{ckpt_id}-{n}"
                (self.directory / str(ckpt_id)).rename(dest)
                _report(f"moved damaged checkpoint {ckpt_id} to {dest}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("hir_jax_damaged_checkpoints_moved")
        self.manager.reload()

    def restore_loop(self, ckpt_id: int) -> dict[str, Any]:
        out = self.manager.restore(ckpt_id, args=ocp.args.Composite(loop=ocp.args.JsonRestore()))
        return dict(out["loop"])

    def restore_state(self, ckpt_id: int, abstract_state: Any) -> Any:
        """The train state, placed with the shardings of ``abstract_state``'s leaves
        (``None``: as saved, on the host)."""
        out = self.manager.restore(
            ckpt_id, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        return out["state"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self) -> StateCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_same_shape(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """Refuses to resume a checkpoint whose model shape differs from the configured one."""
    diffs = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if diffs:
        detail = ", ".join(f"{k}: saved {a!r} vs configured {b!r}" for k, (a, b) in diffs.items())
        raise ResumeMismatchError(
            f"{where} holds a checkpoint of a different model shape ({detail}); "
            "use a new MODEL_DIR or restore the original model config"
        )


_LEFTOVERS = ("_read_array_index_and_device_put", "Event loop is closed")


def _quiet_failed_reads() -> None:
    """After a failed orbax restore, its reads still in flight fail too, each printed as a
    multi-line TensorStore dump when its coroutine is dropped or its callback finds the
    event loop closed. From then on this process's unraisable-exception hook drops those
    two kinds (and passes every other one on)."""
    previous = sys.unraisablehook
    if getattr(previous, "hir_jax_quiet", False):
        return

    def hook(unraisable: Any) -> None:
        text = f"{unraisable.object!r} {unraisable.exc_value!r}"
        if not any(marker in text for marker in _LEFTOVERS):
            previous(unraisable)

    hook.hir_jax_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
    gc.collect()


def _one_line(exc: BaseException) -> str:
    """``gin_cli.one_line`` without the TensorStore spec that read errors quote."""
    text = one_line(exc).split(" See full TensorStore details")[0].rstrip(".")
    return text[:300] + " ..." if len(text) > 300 else text


def _report(message: str) -> None:
    from hir_jax import metrics_log

    if jax.process_index() == 0:
        metrics_log.console(message)

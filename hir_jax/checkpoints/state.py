"""Our own training checkpoints: the train state and the loop state, with orbax.

A checkpoint under ``MODEL_DIR/checkpoints/<id>`` holds two items: ``state`` (the
``TrainState`` pytree: params, optimizer state, step, rng; restored straight into its
sharded layout) and ``loop`` (JSON: round, phase, replay buffer, metrics so far, the
model's shape). Ids increase with progress: ``round * ROUND_STRIDE + step_in_round``.
"""

from __future__ import annotations

from typing import Any

import orbax.checkpoint as ocp

from hir_jax.paths import as_path

ROUND_STRIDE = 10_000_000


class ResumeMismatchError(ValueError):
    """MODEL_DIR holds a checkpoint of another model shape than the configured one."""


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
        """Saves and waits for the write to finish (a preempted host may not get later)."""
        self.manager.save(
            ckpt_id,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), loop=ocp.args.JsonSave(loop)
            ),
            force=True,
        )
        self.manager.wait_until_finished()

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

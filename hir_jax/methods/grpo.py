"""GRPO: group-relative advantages, the clipped ratio objective and a k3 KL penalty to
the frozen reference, no value head (Shao et al. 2024, DeepSeekMath; TRL's
``GRPOTrainer``, google/tunix's GRPO).

A round: K outputs per training question (``LoopConfig.samples_per_query``, the group;
K >= 2); each output's advantage is ``(r - group mean) / (group std + 1e-4)`` (TRL),
given to all its actions; ``epochs`` passes (TRL's ``num_iterations``, default 1) over
minibatches minimise, per action, ``max(-A r_t, -A clip(r_t)) + beta * k3(pi, pi_ref)``,
averaged over each output's actions and then over outputs (the paper's 1/G sum 1/|o|).
beta 0.04 is DeepSeekMath's; the reference's log-probabilities come from the scoring pass
once per round.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import gin
import jax
import jax.numpy as jnp
import numpy as np

from hir_jax import advantages, features, rl_losses, settings
from hir_jax.methods.base import Annotations, Sample
from hir_jax.methods.rl import OnPolicy, Reward, rewards
from hir_jax.rl_step import TokenOutputs, additive
from hir_jax.train import StateExtras

Array = jax.Array
W = features.DECODER_WEIGHTS


def _per_example(x: Array, mask: Array) -> Array:
    """Each row's mean over its actions ``[B]`` (0 for an empty row)."""
    n = jnp.sum(jnp.asarray(mask, jnp.float32), -1)
    return jnp.where(n > 0, jnp.sum(x, -1) / jnp.maximum(n, 1.0), 0.0)


@dataclasses.dataclass(frozen=True)
class GRPOObjective:
    """Per-output mean over actions of the clipped term + beta x k3, mean over outputs."""

    clip: float
    beta: float
    keys: tuple[str, ...] = (features.OLD_LOGPROBS, features.REF_LOGPROBS, features.ADVANTAGES)
    with_values: bool = False

    def __call__(
        self, out: TokenOutputs, batch: Any, norms: tuple[Array, Array]
    ) -> tuple[Array, dict[str, Array]]:
        mask = batch[W]
        pg, clipped = rl_losses.clipped_policy_loss(
            out.logprobs, batch[features.OLD_LOGPROBS], batch[features.ADVANTAGES], mask,
            self.clip,
        )  # fmt: skip
        kl = rl_losses.k3_kl(out.logprobs, batch[features.REF_LOGPROBS], mask)
        examples = jnp.maximum(norms[0], 1.0)
        pg_ex, kl_ex = _per_example(pg, mask), _per_example(kl, mask)
        loss = jnp.sum(pg_ex + self.beta * kl_ex) / examples
        rows = jnp.sum(jnp.sum(jnp.asarray(mask, jnp.float32), -1) > 0).astype(jnp.float32)
        n = jnp.sum(jnp.asarray(mask, jnp.float32))
        return additive(
            loss,
            {
                "policy_loss": (jnp.sum(pg_ex), rows),
                "kl": (jnp.sum(kl_ex), rows),
                "entropy": (jnp.sum(out.entropy), n),
                "clip_fraction": (jnp.sum(clipped), n),
            },
        )


@gin.configurable(module="hir_jax.methods")
@dataclasses.dataclass(frozen=True)
class GRPO(OnPolicy):
    """GRPO for FLAN-T5 (see the module doc). ``reward``: "judge" or "constant"."""

    name: ClassVar[str] = "grpo"
    epochs: int | None = 1
    clip: float = 0.2
    beta: float = 0.04
    eps: float = 1e-4
    reward: Reward = "judge"
    dropout: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        S = settings
        S.check(self.gin_name(), self, clip=S.NON_NEGATIVE, beta=S.NON_NEGATIVE, eps=S.POSITIVE)

    def state_extras(self) -> StateExtras:
        return StateExtras(reference=True)

    def objective(self) -> GRPOObjective:
        return GRPOObjective(self.clip, self.beta)

    def annotate(
        self,
        items: Sequence[Sample],
        scores: Sequence[dict[str, Any]],
        method_state: dict[str, float],
    ) -> Annotations:
        groups = [s.query for s in items]
        counts = np.unique(groups, return_counts=True)[1]
        if len(counts) and counts.max() < 2:
            raise ValueError(
                "GRPO needs K >= 2 outputs per question (a group); set "
                "LoopConfig.samples_per_query = 4 (runs/grpo.gin)"
            )
        score = rewards(items, self.reward)
        adv = advantages.group_advantages(score, groups, self.eps)
        per_item = [
            {
                features.OLD_LOGPROBS: np.asarray(s["logprobs"], np.float32),
                features.REF_LOGPROBS: np.asarray(s["ref_logprobs"], np.float32),
                features.ADVANTAGES: np.full(len(s["logprobs"]), a, np.float32),
            }
            for s, a in zip(scores, adv, strict=True)
        ]
        metrics = {
            "reward": float(score.mean()) if len(items) else 0.0,
            "zero_advantage_fraction": float(np.mean(adv == 0)) if len(items) else 0.0,
        }
        return per_item, dict(method_state), metrics

"""PPO with a value head and a KL penalty to the frozen initial policy (Ziegler et al.
2019; TRL <= 0.11's seq2seq ``PPOTrainer``; RL4LMs' T5 PPO).

A round: the loop samples K outputs per training question (the rollout, N_train x K
outputs, the same budget as an HIR round); the scoring pass gives log pi, log pi_ref and
V for every action; ``annotate`` puts ``-beta (log pi - log pi_ref)`` on every action
and the judge's 1/0 on the last (0 for an output without EOS), runs GAE (gamma, lambda)
and whitens the advantages over the rollout; then ``epochs`` PPO epochs over minibatches
of ``LoopConfig.batch_size`` minimise the clipped policy loss + ``value_coef`` x the
clipped value loss - ``entropy_coef`` x the entropy (token means over the minibatch,
as TRL). The KL coefficient is fixed (``kl_target=None``) or adapted after each rollout
(TRL's controller).

Defaults are TRL's PPOConfig (init KL coefficient 0.2, target 6, horizon 10000, 4
epochs, clip 0.2, value clip 0.2, value coefficient 0.1, gamma 1, lambda 0.95, no
entropy bonus). Why beta 0.2 suits answers of a few tokens: the KL-regularised optimum
is pi* ~ pi_ref exp(r / beta); with beta 0.2 a 0/1 reward multiplies the correct
answer's odds by e^5 ~ 148 (from 1/3 to 99% on a three-way choice), while the KL of a
fully sharpened three-token answer is about log 3 ~ 1.1 nats, far below the target 6, so
the adaptive controller lowers beta by at most 0.2 x rollout / horizon per round
(1.2% for 600 outputs) and beta stays near 0.2.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import gin
import jax
import jax.numpy as jnp

from hir_jax import advantages, features, rl_losses, settings
from hir_jax.methods.base import Annotations, Sample
from hir_jax.methods.rl import OnPolicy, Reward, padded, rewards, unpad
from hir_jax.rl_step import TokenOutputs, additive, value_heads
from hir_jax.train import StateExtras

Array = jax.Array
W = features.DECODER_WEIGHTS


@dataclasses.dataclass(frozen=True)
class PPOObjective:
    """Clipped policy loss + value_coef x clipped value loss - entropy_coef x entropy,
    each a mean over the whole batch's tokens."""

    clip: float
    value_clip: float
    value_coef: float
    entropy_coef: float
    keys: tuple[str, ...] = (
        features.OLD_LOGPROBS, features.OLD_VALUES, features.ADVANTAGES, features.RETURNS,
    )  # fmt: skip
    with_values: bool = True

    def __call__(
        self, out: TokenOutputs, batch: Any, norms: tuple[Array, Array]
    ) -> tuple[Array, dict[str, Array]]:
        mask = batch[W]
        tokens = norms[1]
        pg, clipped = rl_losses.clipped_policy_loss(
            out.logprobs, batch[features.OLD_LOGPROBS], batch[features.ADVANTAGES], mask,
            self.clip,
        )  # fmt: skip
        vf = rl_losses.clipped_value_loss(
            out.values, batch[features.OLD_VALUES], batch[features.RETURNS], mask,
            self.value_clip,
        )  # fmt: skip
        pg_sum, vf_sum, ent_sum = jnp.sum(pg), jnp.sum(vf), jnp.sum(out.entropy)
        safe = jnp.maximum(tokens, 1.0)
        loss = (pg_sum + self.value_coef * vf_sum - self.entropy_coef * ent_sum) / safe
        n = jnp.sum(jnp.asarray(mask, jnp.float32))
        kl = rl_losses.approx_kl(out.logprobs, batch[features.OLD_LOGPROBS], mask)
        return additive(
            loss,
            {
                "policy_loss": (pg_sum, n),
                "value_loss": (vf_sum, n),
                "entropy": (ent_sum, n),
                "clip_fraction": (jnp.sum(clipped), n),
                "approx_kl": (jnp.sum(kl), n),
            },
        )


@gin.configurable(module="hir_jax.methods")
@dataclasses.dataclass(frozen=True)
class PPO(OnPolicy):
    """PPO for FLAN-T5 (see the module doc for the defaults and their sources).

    ``kl_coef`` is the initial beta; ``kl_target=None`` keeps it fixed. ``reward``:
    "judge" (the task's 1/0) or "constant" (the ablation). ``dropout``: dropout in the
    PPO passes (off: the ratio of an unchanged policy is exactly 1).
    """

    name: ClassVar[str] = "ppo"
    with_values: ClassVar[bool] = True
    epochs: int | None = 4
    clip: float = 0.2
    value_clip: float = 0.2
    value_coef: float = 0.1
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    kl_coef: float = 0.2
    kl_target: float | None = 6.0
    kl_horizon: int = 10000
    value_head_std: float = 0.01
    reward: Reward = "judge"
    dropout: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        S = settings
        S.check(
            self.gin_name(), self,
            clip=S.NON_NEGATIVE, value_clip=S.NON_NEGATIVE, value_coef=S.NON_NEGATIVE,
            entropy_coef=S.NON_NEGATIVE, gamma=S.PROBABILITY, lam=S.PROBABILITY,
            kl_coef=S.NON_NEGATIVE, kl_target=S.POSITIVE.or_none(),
            kl_horizon=S.POSITIVE_INT, value_head_std=S.NON_NEGATIVE,
        )  # fmt: skip

    def state_extras(self) -> StateExtras:
        return StateExtras(heads=value_heads(self.value_head_std), reference=True)

    def objective(self) -> PPOObjective:
        return PPOObjective(self.clip, self.value_clip, self.value_coef, self.entropy_coef)

    def controller(self) -> advantages.KLController:
        return advantages.KLController(self.kl_coef, self.kl_target, self.kl_horizon)

    def annotate(
        self,
        items: Sequence[Sample],
        scores: Sequence[dict[str, Any]],
        method_state: dict[str, float],
    ) -> Annotations:
        coef = float(method_state.get("kl_coef", self.kl_coef))
        rows = [s["logprobs"] for s in scores]
        logp, mask = padded(rows)
        ref, _ = padded([s["ref_logprobs"] for s in scores])
        values, _ = padded([s["values"] for s in scores])
        score = rewards(items, self.reward)
        r, kl = advantages.kl_rewards(logp, ref, score, mask, coef)
        adv, returns = advantages.gae(r, values, mask, self.gamma, self.lam)
        if self.whiten_advantages:
            adv = advantages.masked_whiten(adv, mask)
        per_item = [
            {
                features.OLD_LOGPROBS: a,
                features.OLD_VALUES: v,
                features.ADVANTAGES: g,
                features.RETURNS: ret,
            }
            for a, v, g, ret in zip(
                unpad(logp, rows),
                unpad(values, rows),
                unpad(adv, rows),
                unpad(returns, rows),
                strict=True,
            )  # fmt: skip
        ]
        mean_kl = float(kl.sum(1).mean()) if len(rows) else 0.0
        metrics = {
            "reward": float(score.mean()) if len(rows) else 0.0,
            "rollout_kl": mean_kl,
            "kl_coef": coef,
            "value_mean": advantages.masked_mean(values, mask),
        }
        new_coef = self.controller().update(coef, mean_kl, len(rows))
        return per_item, {**method_state, "kl_coef": new_coef}, metrics

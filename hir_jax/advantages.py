"""Rewards, advantages and the KL controller of the RL baselines (pure NumPy).

Arrays are ``[N, L]`` over a rollout's decoder positions (one row per sampled output,
the actions being its tokens and its EOS when it has one) with a 0/1 ``mask``; values
where the mask is 0 are ignored and come back as 0. They are computed once per round
on the host, over the whole rollout batch (``N_train x K`` outputs).

PPO (Ziegler et al. 2019; TRL <= 0.11 ``PPOTrainer``): ``kl_rewards`` puts
``-kl_coef * (log pi - log pi_ref)`` on every action and the task score on the last
one; ``gae`` gives the advantages and returns; ``masked_whiten`` whitens the advantages
over the batch. GRPO (Shao et al. 2024): ``group_advantages`` normalises each output's
score within the K outputs of its prompt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


def last_positions(mask: np.ndarray) -> np.ndarray:
    """Index of each row's last unmasked position (-1 for an empty row)."""
    mask = np.asarray(mask) > 0
    length = mask.shape[1]
    last = length - 1 - np.argmax(mask[:, ::-1], axis=1)
    return np.where(mask.any(axis=1), last, -1)


def kl_rewards(
    logprobs: np.ndarray,
    ref_logprobs: np.ndarray,
    scores: np.ndarray,
    mask: np.ndarray,
    kl_coef: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-action rewards ``-kl_coef * kl`` plus ``scores`` on each row's last action, and
    the per-action KL estimate ``kl = log pi - log pi_ref`` (both 0 off the mask)."""
    mask = np.asarray(mask, np.float64)
    kl = (np.asarray(logprobs, np.float64) - np.asarray(ref_logprobs, np.float64)) * mask
    rewards = -kl_coef * kl
    last = last_positions(mask)
    rows = np.nonzero(last >= 0)[0]
    rewards[rows, last[rows]] += np.asarray(scores, np.float64)[rows]
    return rewards, kl


def gae(
    rewards: np.ndarray,
    values: np.ndarray,
    mask: np.ndarray,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[np.ndarray, np.ndarray]:
    """Generalised advantage estimation (Schulman et al. 2016) per row.

    ``values[t]`` is V of the state before action t; the value after a row's last action
    is 0 (the episode ends there, finished or cut). Returns ``(advantages, returns)``
    with ``returns = advantages + values``, 0 off the mask.
    """
    mask = np.asarray(mask, np.float64)
    rewards = np.asarray(rewards, np.float64) * mask
    values = np.asarray(values, np.float64) * mask
    n, length = rewards.shape
    advantages = np.zeros((n, length))
    running = np.zeros(n)
    next_value = np.zeros(n)
    for t in range(length - 1, -1, -1):
        on = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = np.where(on > 0, delta + gamma * lam * running, 0.0)
        advantages[:, t] = running
        next_value = np.where(on > 0, values[:, t], 0.0)
    return advantages, (advantages + values) * mask


def masked_whiten(x: np.ndarray, mask: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """``(x - mean) / sqrt(var + eps)`` over the masked entries (unbiased variance, as
    TRL's ``masked_whiten``); 0 off the mask."""
    mask = np.asarray(mask, np.float64)
    x = np.asarray(x, np.float64)
    n = mask.sum()
    if n < 2:
        return np.zeros_like(x)
    mean = (x * mask).sum() / n
    var = (((x - mean) ** 2) * mask).sum() / (n - 1)
    return (x - mean) / np.sqrt(var + eps) * mask


def group_advantages(scores: np.ndarray, groups: Sequence[int], eps: float = 1e-4) -> np.ndarray:
    """GRPO's outcome advantage: ``(score - group mean) / (group std + eps)`` with the
    group of each output (its prompt); unbiased std as TRL's ``GRPOTrainer``. A group of
    one output, or one whose scores are all equal, gets advantage 0."""
    scores = np.asarray(scores, np.float64)
    groups = np.asarray(groups)
    out = np.zeros_like(scores)
    for g in np.unique(groups):
        idx = np.nonzero(groups == g)[0]
        s = scores[idx]
        if len(idx) < 2:
            continue
        out[idx] = (s - s.mean()) / (s.std(ddof=1) + eps)
    return out


def masked_mean(x: np.ndarray, mask: np.ndarray) -> float:
    mask = np.asarray(mask, np.float64)
    return float((np.asarray(x, np.float64) * mask).sum() / max(mask.sum(), 1.0))


@dataclasses.dataclass(frozen=True)
class KLController:
    """The KL coefficient: fixed (``target=None``) or adaptive (Ziegler et al. 2019, TRL's
    ``AdaptiveKLController``): after a batch of ``n_steps`` samples with mean KL ``kl``
    (summed over a sample's actions), ``coef *= 1 + clip(kl / target - 1, -0.2, 0.2) *
    n_steps / horizon``."""

    init_coef: float = 0.2
    target: float | None = 6.0
    horizon: int = 10000

    def update(self, coef: float, kl: float, n_steps: int) -> float:
        if self.target is None:
            return coef
        error = float(np.clip(kl / self.target - 1.0, -0.2, 0.2))
        return coef * (1.0 + error * n_steps / self.horizon)

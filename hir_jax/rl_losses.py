"""The clipped policy and value losses of PPO and GRPO (pure ``jnp``, per token).

Inputs are ``[B, L]`` over decoder positions with a 0/1 ``mask`` (the actions: an
output's tokens and its EOS; never the decoder-start input, padding or anything after
EOS). Each function returns per-token terms that are 0 off the mask; the objectives in
``hir_jax.methods.ppo``/``grpo`` sum them with their own normalisers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _on(mask: Array) -> Array:
    return jnp.asarray(mask, jnp.float32) > 0


def clipped_policy_loss(
    logprobs: Array, old_logprobs: Array, advantages: Array, mask: Array, clip: float
) -> tuple[Array, Array]:
    """PPO's ``max(-A r, -A clip(r, 1-eps, 1+eps))`` per token with ``r = exp(logp -
    logp_old)``, and whether clipping was active (the clip fraction's numerator)."""
    ratio = jnp.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    on = _on(mask)
    loss = jnp.where(on, jnp.maximum(unclipped, clipped), 0.0)
    active = jnp.where(on, (clipped > unclipped).astype(jnp.float32), 0.0)
    return loss, active


def clipped_value_loss(
    values: Array, old_values: Array, returns: Array, mask: Array, clip: float
) -> Array:
    """``0.5 * max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2)`` per token (TRL)."""
    clipped = old_values + jnp.clip(values - old_values, -clip, clip)
    loss = 0.5 * jnp.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return jnp.where(_on(mask), loss, 0.0)


def k3_kl(logprobs: Array, ref_logprobs: Array, mask: Array) -> Array:
    """The k3 estimator of KL(pi || pi_ref) per token (Schulman 2020; GRPO):
    ``exp(ref - logp) - (ref - logp) - 1 >= 0``, exactly 0 where the two agree."""
    d = ref_logprobs - logprobs
    return jnp.where(_on(mask), jnp.exp(d) - d - 1.0, 0.0)


def approx_kl(logprobs: Array, old_logprobs: Array, mask: Array) -> Array:
    """``0.5 * (logp - logp_old)^2`` per token: how far an update moved the policy."""
    return jnp.where(_on(mask), 0.5 * (logprobs - old_logprobs) ** 2, 0.0)

"""The RL methods' device code: a value head, the rollout scorer and the clipped-objective
train step.

* ``value_head_init``/``values``: a dense ``d_model -> 1`` layer on the decoder's last
  hidden state (``T5.hidden``, the input of the LM head), as TRL's seq2seq value head;
  it shares the T5 body and lives in ``TrainState.heads["value"]``.
* ``make_rollout_scorer``: once per round, before any update, the policy's and the
  frozen reference's log-probabilities of every action and the value of every state
  (teacher-forced, no dropout); they become the batch's ``old_logprobs``,
  ``ref_logprobs`` and ``old_values``.
* ``make_rl_step``: the jitted, sharded, donated step of an ``Objective`` (PPO's or
  GRPO's loss over the token outputs), with gradient accumulation and the same optimizer
  over the T5 parameters and the heads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from hir_jax import features, losses
from hir_jax.model.configs import T5Config
from hir_jax.model.t5 import T5, lm_head
from hir_jax.partitioning import Partitioner, to_host
from hir_jax.train import (
    Optimizer,
    ShardedStep,
    StateExtras,
    TrainState,
    accumulate_gradients,
    apply_gradients,
    jit_step,
    nll_loss_config,
    train_state_shardings,
    trainable,
)

Array = jax.Array
Batch = Mapping[str, Any]
Metrics = dict[str, Array]

POS, DEC_IN = features.ENCODER_POS, features.DECODER_INPUT
TARGETS, WEIGHTS = features.DECODER_TARGET, features.DECODER_WEIGHTS
ROLLOUT_KEYS = (POS, DEC_IN, TARGETS, WEIGHTS)


# --------------------------------------------------------------------------- value head


def value_head_init(config: T5Config, rng: Array, std: float = 0.01) -> dict[str, Array]:
    """``{"kernel": [d_model, 1] ~ N(0, std^2 / d_model), "bias": [1] = 0}`` in float32:
    a small initialisation, so the first values are near 0."""
    kernel = jax.random.normal(rng, (config.d_model, 1), jnp.float32)
    return {"kernel": kernel * (std / np.sqrt(config.d_model)), "bias": jnp.zeros((1,))}


def value_heads(std: float = 0.01) -> Callable[[T5Config, Array], dict[str, Any]]:
    """``StateExtras.heads`` of a method with a value head."""

    def init(config: T5Config, rng: Array) -> dict[str, Any]:
        return {"value": value_head_init(config, rng, std)}

    return init


def values(head: Mapping[str, Array], hidden: Array) -> Array:
    """V of each decoder state ``[B, L]`` (float32) from ``T5.hidden`` outputs."""
    h = hidden.astype(jnp.float32)
    return (h @ head["kernel"].astype(jnp.float32))[..., 0] + head["bias"][0]


# --------------------------------------------------------------------------- token outputs


@dataclasses.dataclass(frozen=True)
class TokenOutputs:
    """Per action ``[B, L]``: log pi(a_t), the policy's entropy and (with a value head)
    V(s_t); 0 off the mask."""

    logprobs: Array
    entropy: Array
    values: Array | None


def token_outputs(
    model: T5,
    params: Any,
    heads: Any,
    batch: Batch,
    rng: Array | None,
    with_values: bool,
) -> TokenOutputs:
    """One teacher-forced pass over the rollout batch (dropout when ``rng`` is a key and
    the model has a dropout rate)."""
    dropout = rng is not None and model.config.dropout_rate > 0
    hidden = model.apply(
        {"params": params},
        batch[POS],
        batch[DEC_IN],
        enable_dropout=dropout,
        rngs={"dropout": rng} if dropout else None,
        method=T5.hidden,
    )
    logits = lm_head(model.config, params, hidden)
    on = jnp.asarray(batch[WEIGHTS]) > 0
    logp = losses.token_log_likelihood(logits, batch[TARGETS], batch[WEIGHTS])
    log_probs = jax.nn.log_softmax(logits, axis=-1)  # the same op: XLA computes it once
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
    v = values(heads["value"], hidden) if with_values else None

    def masked(x: Array) -> Array:
        return jnp.where(on, x, 0.0)

    return TokenOutputs(logp, masked(entropy), None if v is None else masked(v))


# --------------------------------------------------------------------------- rollout scorer


def make_rollout_scorer(
    model: T5, partitioner: Partitioner, extras: StateExtras, with_values: bool
) -> Callable[[TrainState, Batch], dict[str, np.ndarray]]:
    """``(state, batch) -> {"logprobs", "ref_logprobs"[, "values"]}`` as host ``[B, L]``
    arrays: the policy's and the reference's log-probabilities of each action and the
    value of each state, without dropout (called once per round, before updating)."""
    config = model.config
    sh = train_state_shardings(config, None, partitioner, extras)

    def score(params: Any, heads: Any, reference: Any, batch: Batch) -> dict[str, Array]:
        with partitioner.context():
            out = token_outputs(model, params, heads, batch, None, with_values)
            ref = token_outputs(model, reference, heads, batch, None, False)
            result = {"logprobs": out.logprobs, "ref_logprobs": ref.logprobs}
            if out.values is not None:
                result["values"] = out.values
        return result

    jitted = jax.jit(
        score,
        in_shardings=(sh.params, sh.heads, sh.reference, partitioner.batch_sharding),
        out_shardings=partitioner.batch_sharding,
    )

    def call(state: TrainState, batch: Batch) -> dict[str, np.ndarray]:
        placed = partitioner.shard_batch(features.pick(batch, ROLLOUT_KEYS))
        return to_host(jitted(state.params, state.heads, state.reference, placed))

    return call


# --------------------------------------------------------------------------- train step


class Objective(Protocol):
    """A clipped-ratio objective over ``TokenOutputs`` (PPO's, GRPO's).

    ``keys``: the batch features it reads besides the rollout's tokens; ``with_values``:
    it needs the value head. ``__call__(outputs, batch, norms)`` returns the loss of a
    (micro)batch normalised by the whole batch's ``norms`` (``losses.normalisers``) and
    additive metrics (``X_sum``/``X_count`` pairs).
    """

    keys: tuple[str, ...]
    with_values: bool

    def __call__(
        self, outputs: TokenOutputs, batch: Batch, norms: tuple[Array, Array]
    ) -> tuple[Array, Metrics]: ...


def make_rl_step(
    model: T5,
    optimizer: Optimizer,
    partitioner: Partitioner,
    objective: Objective,
    extras: StateExtras,
    *,
    num_microbatches: int = 1,
    dropout: bool = False,
    donate: bool = True,
) -> ShardedStep:
    """The jitted step ``(state, batch) -> (state, metrics)`` of ``objective``.

    The optimizer updates the T5 parameters and the heads together; the reference is
    carried unchanged. ``dropout=False`` (default, as most PPO set-ups): the updated
    policy is scored deterministically like the rollout, so the first ratio is exactly 1.
    Metrics: the objective's means, ``grad_norm``, ``learning_rate``.
    """
    config = model.config
    state_sh = train_state_shardings(config, optimizer, partitioner, extras)
    grad_sh = trainable(state_sh.params, state_sh.heads)
    keys = tuple(dict.fromkeys(ROLLOUT_KEYS + tuple(objective.keys)))

    def step_fn(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        with partitioner.context():
            rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
            norms = losses.normalisers(batch[WEIGHTS])
            has_heads = bool(jax.tree.leaves(state.heads))

            def loss_fn(tree: Any, mb: Batch, key: Array | None) -> tuple[Array, Metrics]:
                params, heads = (tree["params"], tree["heads"]) if has_heads else (tree, None)
                outs = token_outputs(model, params, heads, mb, key, objective.with_values)
                return objective(outs, mb, norms)

            grads, summed = accumulate_gradients(
                loss_fn, state.trainable(), batch, rng if dropout else None,
                num_microbatches, partitioner, grad_sh,
            )  # fmt: skip
            metrics = dict(losses.finalize_metrics(summed))
            metrics["loss"] = summed["loss"]
            return apply_gradients(optimizer, state, grads, metrics)

    jitted = jit_step(step_fn, state_sh, partitioner, donate)
    return ShardedStep(jitted, partitioner, nll_loss_config(), keys=keys)


def additive(loss: Array, terms: Mapping[str, tuple[Array, Array]]) -> tuple[Array, Metrics]:
    """``(loss, {"loss": loss, "X_sum": s, "X_count": n, ...})`` from ``{X: (s, n)}``."""
    metrics: Metrics = {"loss": loss}
    for name, (s, n) in terms.items():
        metrics[name + "_sum"], metrics[name + "_count"] = s, jnp.asarray(n, jnp.float32)
    return loss, metrics

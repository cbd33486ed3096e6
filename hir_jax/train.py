"""Train state, optimizers, and the jitted, sharded HIR / NLL train step with accumulation.

A batch follows the contract of ``hir_jax.features`` (feature names, which ones a loss
needs).

The positive and negative encoder inputs go through the model as one batch of ``2B``
rows (interleaved, so every device keeps its own examples), so the contrastive term needs
neither a second pass of the data pipeline nor a second model call.

Gradient accumulation: ``num_microbatches = k`` splits the batch into k microbatches of
``B/k`` (example ``i*k + j`` goes to microbatch j, so each device keeps its rows) and sums
their gradients in a ``lax.scan``. The loss normalisers (example and token counts) are
computed once on the whole batch (``losses.normalisers``), so k microbatches give the
gradient of one batch of the same examples.

Typical use (the HIR loop)::

    part = partitioning.make_partitioner(data=-1, model=1)
    opt = make_optimizer()                                  # AdamW 5e-4, wd 0, constant
    state = create_train_state(config, params, opt, part, jax.random.key(0))
    step = make_train_step(T5(config), opt, part, loss=LossConfig(), num_microbatches=4)
    state, metrics = step(state, numpy_batch)    # state is donated; batch put on the mesh
    metrics = jax.device_get(metrics)     # loss, nll, contrastive, entropy, token_accuracy,
                                          # grad_norm, learning_rate, num_examples, num_tokens
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import flax.struct
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from hir_jax import features, losses, partitioning, settings
from hir_jax.checkpoints import lazy
from hir_jax.model.configs import T5Config
from hir_jax.model.t5 import T5, lm_head, param_shapes
from hir_jax.partitioning import Partitioner, PartitioningError

Array = jax.Array
Batch = Mapping[str, Any]
Metrics = dict[str, Array]

POS, NEG = features.ENCODER_POS, features.ENCODER_NEG
DEC_IN, TARGETS, WEIGHTS = features.DECODER_INPUT, features.DECODER_TARGET, features.DECODER_WEIGHTS
POS_IS_CORRECT = features.POS_IS_CORRECT


# --------------------------------------------------------------------------- state


@flax.struct.dataclass
class TrainState:
    """Everything a train step updates: a plain pytree (checkpointable by orbax).

    ``rng`` is raw key data (``jax.random.key_data``, uint32) so that it serialises like any
    array; each step derives its dropout key as ``fold_in(rng, step)``, so a resumed run
    draws the same dropout masks as an uninterrupted one.
    """

    step: Array
    params: Any
    opt_state: Any
    rng: Array
    # A method's extra trainable parameters (PPO's value head) and a frozen copy of the
    # policy's parameters (the KL reference); empty unless ``StateExtras`` asks for them.
    heads: Any = optax.EmptyState()
    reference: Any = optax.EmptyState()

    def trainable(self) -> Any:
        """What the optimizer updates: the T5 parameters, with the heads when there are."""
        return trainable(self.params, self.heads)


def trainable(params: Any, heads: Any) -> Any:
    """The optimizer's tree: ``params`` alone (every method without heads), else both."""
    return params if not jax.tree.leaves(heads) else {"params": params, "heads": heads}


@dataclasses.dataclass(frozen=True)
class StateExtras:
    """What a method keeps in the train state beside the T5 parameters.

    ``heads(config, rng)`` initialises extra trainable parameters (replicated; e.g. a
    value head), updated by the same optimizer; ``reference=True`` keeps a frozen copy
    of the initial parameters (sharded like them, never updated).
    """

    heads: Callable[[T5Config, Array], Any] | None = None
    reference: bool = False

    def head_shapes(self, config: T5Config) -> Any:
        if self.heads is None:
            return optax.EmptyState()
        return jax.eval_shape(functools.partial(self.heads, config), jax.random.key(0))


def _key_data(rng: Array) -> Array:
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    return jnp.asarray(rng, jnp.uint32)


# --------------------------------------------------------------------------- optimizer


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """An optax transformation and its learning-rate schedule (for the metrics)."""

    tx: optax.GradientTransformation
    learning_rate: Callable[[Array], Array]


def make_schedule(
    learning_rate: float,
    schedule: str = "constant",
    warmup_steps: int = 0,
    total_steps: int | None = None,
) -> Callable[[Array], Array]:
    """Learning rate per step: "constant" (the paper), or "linear"/"cosine" decay to 0 at
    ``total_steps``; with ``warmup_steps`` a linear warmup from 0 comes first."""
    if schedule == "constant":
        main: Callable[[Array], Array] = optax.constant_schedule(learning_rate)
    elif schedule in ("linear", "cosine"):
        if not total_steps:
            raise ValueError(f"schedule {schedule!r} needs total_steps")
        n = max(total_steps - warmup_steps, 1)
        main = (
            optax.linear_schedule(learning_rate, 0.0, n)
            if schedule == "linear"
            else optax.cosine_decay_schedule(learning_rate, n)
        )
    else:
        raise ValueError(f"unknown schedule {schedule!r}: constant, linear or cosine")
    if warmup_steps:
        warm = optax.linear_schedule(0.0, learning_rate, warmup_steps)
        return optax.join_schedules([warm, main], [warmup_steps])
    return main


def _decay_mask(decay_norms: bool) -> Callable[[Any], Any] | None:
    """Weight-decay mask: the released code exempts layer-norm scales from decay."""
    if decay_norms:
        return None

    def mask(params: Any) -> Any:
        def is_decayed(path: tuple[Any, ...], _: Any) -> bool:
            return getattr(path[-1], "key", None) != "scale"

        return jax.tree_util.tree_map_with_path(is_decayed, params)

    return mask


@gin.configurable(module="hir_jax.train")
def make_optimizer(
    name: Literal["adamw", "adafactor"] = "adamw",
    learning_rate: float = 5e-4,
    schedule: str = "constant",
    warmup_steps: int = 0,
    total_steps: int | None = None,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    decay_norms: bool = False,
    max_grad_norm: float | None = None,
    adafactor_decay_rate: float = 0.8,
    adafactor_clipping_threshold: float | None = 1.0,
    adafactor_multiply_by_parameter_scale: bool = True,
) -> Optimizer:
    """The optimizer, selectable from gin (``make_optimizer.name = "adafactor"``).

    Defaults are the paper's and the released code's: AdamW (torch semantics: decoupled
    weight decay, bias correction, eps outside the sqrt), lr 5e-4, weight decay 0,
    constant schedule, no warmup, no gradient clipping. ``decay_norms=False`` exempts
    RMSNorm scales from weight decay like the released code. Adafactor uses T5X's
    settings (decay rate 0.8, update clipping 1.0, parameter-scaled updates).
    """
    S = settings
    S.check(  # learning rate 0: a frozen model (for tests and probes)
        "hir_jax.train.make_optimizer", locals(),
        name=S.one_of("adamw", "adafactor"), learning_rate=S.NON_NEGATIVE, warmup_steps=S.COUNT,
        total_steps=S.POSITIVE_INT.or_none(), weight_decay=S.NON_NEGATIVE,
        b1=S.FRACTION, b2=S.FRACTION, eps=S.NON_NEGATIVE,
        max_grad_norm=S.NON_NEGATIVE.or_none(),
    )  # fmt: skip
    lr = make_schedule(learning_rate, schedule, warmup_steps, total_steps)
    if name == "adamw":
        tx = optax.adamw(
            lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=_decay_mask(decay_norms)
        )
    else:  # "adafactor" (checked above)
        tx = optax.adafactor(
            lr,
            decay_rate=adafactor_decay_rate,
            clipping_threshold=adafactor_clipping_threshold,
            multiply_by_parameter_scale=adafactor_multiply_by_parameter_scale,
            weight_decay_rate=weight_decay or None,
            weight_decay_mask=_decay_mask(decay_norms),
        )
    if max_grad_norm:
        tx = optax.chain(optax.clip_by_global_norm(max_grad_norm), tx)
    return Optimizer(tx=tx, learning_rate=lr)


# --------------------------------------------------------------------------- loss config


@gin.configurable(module="hir_jax.train")
@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Which loss the step optimises; the fields are ``losses.hir_loss``'s keywords.

    ``kind="hir"``: label-smoothed NLL + alpha * contrastive - beta * entropy (defaults:
    the released code). ``kind="nll"``: plain (optionally smoothed) NLL for SFT/FARL; only
    ``encoder_pos_tokens`` is needed and ``contrastive``/``alpha``/``beta`` are ignored.
    """

    kind: Literal["hir", "nll"] = "hir"
    label_smoothing: float = 0.2
    contrastive: losses.ContrastiveKind = "binary"
    contrastive_eps: float = 0.2
    contrastive_log_eps: float = losses.RELEASED_LOG_EPS
    alpha: float = 1.0
    beta: float = 0.001
    normalisation: losses.Normalisation = "example"
    in_batch_score: Literal["mean", "sum"] = "mean"
    # Train step only: compute the [batch, length, vocab] logits this many decoder
    # positions at a time, recomputed in the backward pass (None: all at once). Same
    # loss and gradients; the logits' memory shrinks from the whole length to one chunk.
    logits_chunk: int | None = None
    # Forward passes of an HIR step with a contrastive term: 2 (one call over the
    # positive and negative rows: NLL, entropy and p+ share the positive pass) or 3 (the
    # released step: NLL and entropy from their own positive pass, then p+ and p-, each
    # with its own dropout mask). Equal without dropout.
    forward_passes: Literal[2, 3] = 2
    # The released code's optional KL term (``--kl_loss``, off in its run.sh): kl_coef x
    # KL(reference || policy) summed over the vocabulary and an example's target tokens,
    # averaged over examples (torch's ``KLDivLoss(reduction="batchmean")`` at the released
    # batch of 1), both models on the original-instruction input (the sampling prompt +
    # the moved prefix); the reference is the frozen initial model (the released value:
    # 0.001). 0: off.
    kl_coef: float = 0.0

    def __post_init__(self) -> None:
        S = settings
        S.check(
            "hir_jax.train.LossConfig", self,
            kind=S.one_of("hir", "nll"), label_smoothing=S.FRACTION,
            contrastive=S.one_of("binary", "in_batch", "none"), contrastive_eps=S.NON_NEGATIVE,
            contrastive_log_eps=S.NON_NEGATIVE, alpha=S.NON_NEGATIVE, beta=S.NON_NEGATIVE,
            normalisation=S.one_of("example", "token"), in_batch_score=S.one_of("mean", "sum"),
            logits_chunk=S.POSITIVE_INT.or_none(), forward_passes=S.one_of(2, 3),
            kl_coef=S.NON_NEGATIVE,
        )  # fmt: skip

    @property
    def needs_negative(self) -> bool:
        return self.kind == "hir" and self.contrastive != "none" and self.alpha != 0


def nll_loss_config(label_smoothing: float = 0.0, normalisation: str = "example") -> LossConfig:
    """Plain NLL (SFT / FARL baselines)."""
    return LossConfig(kind="nll", label_smoothing=label_smoothing, normalisation=normalisation)


# --------------------------------------------------------------------------- forward + loss


def _pad_to(x: Array, length: int) -> Array:
    return x if x.shape[1] == length else jnp.pad(x, ((0, 0), (0, length - x.shape[1])))


def _logits(
    model: T5,
    params: Any,
    batch: Batch,
    rng: Array | None,
    with_negative: bool,
    hidden: bool = False,
) -> tuple[Array, Array | None]:
    """Decoder logits under the positive (and negative) instruction, one model call
    (``hidden=True``: the decoder outputs before the head, ``T5.hidden``)."""
    enable_dropout = model.config.dropout_rate > 0 and rng is not None
    rngs = {"dropout": rng} if enable_dropout else None
    method = T5.hidden if hidden else None
    dec = batch[DEC_IN]
    if not with_negative:
        out = model.apply(
            {"params": params},
            batch[POS],
            dec,
            enable_dropout=enable_dropout,
            rngs=rngs,
            method=method,
        )
        return out, None
    pos, neg = batch[POS], batch[NEG]
    length = max(pos.shape[1], neg.shape[1])
    b = pos.shape[0]
    # Interleave rows (pos_0, neg_0, pos_1, ...): each device keeps its own examples.
    enc = jnp.stack([_pad_to(pos, length), _pad_to(neg, length)], axis=1).reshape(2 * b, length)
    dec2 = jnp.repeat(dec, 2, axis=0)
    out = model.apply(
        {"params": params}, enc, dec2, enable_dropout=enable_dropout, rngs=rngs, method=method
    )
    out = out.reshape((b, 2) + out.shape[1:])
    return out[:, 0], out[:, 1]


def _chunked_token_stats(
    config: T5Config,
    params: Any,
    pos_hidden: Array,
    neg_hidden: Array | None,
    targets: Array,
    weights: Array,
    label_smoothing: float,
    chunk: int,
) -> dict[str, Array]:
    """``losses.token_stats`` summed over slices of ``chunk`` decoder positions.

    A ``lax.scan`` over the slices whose body is rematerialised: the backward pass
    recomputes each slice's logits instead of keeping all of them.
    """
    b, length = targets.shape
    n = -(-length // chunk)
    pad = n * chunk - length

    def slices(x: Array) -> Array:  # [B, L, ...] -> [n, B, chunk, ...], zero-padded
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        return jnp.swapaxes(x.reshape((b, n, chunk) + x.shape[2:]), 0, 1)

    xs = {"pos": slices(pos_hidden), "targets": slices(targets), "weights": slices(weights)}
    if neg_hidden is not None:
        xs["neg"] = slices(neg_hidden)

    @jax.checkpoint
    def body(total: dict[str, Array], x: dict[str, Array]) -> tuple[dict[str, Array], None]:
        neg = lm_head(config, params, x["neg"]) if "neg" in x else None
        stats = losses.token_stats(
            lm_head(config, params, x["pos"]),
            neg,
            x["targets"],
            x["weights"],
            label_smoothing=label_smoothing,
        )
        return jax.tree.map(jnp.add, total, stats), None

    names = ["nll", "entropy", "hits", "pos_ll"] + (["neg_ll"] if neg_hidden is not None else [])
    zeros = {k: jnp.zeros((b,), jnp.float32) for k in names}
    total, _ = jax.lax.scan(body, zeros, xs)
    return total


def _loss_from_stats(
    loss: LossConfig, stats: dict[str, Array], batch: Batch, norms: tuple[Array, Array]
) -> tuple[Array, Metrics]:
    """``losses.hir_loss_from_stats`` with ``loss``'s settings (NLL: no contrastive
    term, beta 0)."""
    hir = loss.kind == "hir"
    return losses.hir_loss_from_stats(
        stats,
        batch[WEIGHTS],
        contrastive=loss.contrastive if hir else "none",
        contrastive_eps=loss.contrastive_eps,
        contrastive_log_eps=loss.contrastive_log_eps,
        alpha=loss.alpha if hir else 0.0,
        beta=loss.beta if hir else 0.0,
        normalisation=loss.normalisation,
        in_batch_score=loss.in_batch_score,
        positive_is_correct=batch.get(POS_IS_CORRECT),
        num_examples=norms[0],
        num_tokens=norms[1],
    )


def _loss_from_logits(
    loss: LossConfig,
    pos_logits: Array,
    neg_logits: Array | None,
    batch: Batch,
    norms: tuple[Array, Array],
) -> tuple[Array, Metrics]:
    stats = losses.token_stats(
        pos_logits,
        neg_logits if loss.needs_negative else None,
        batch[TARGETS],
        batch[WEIGHTS],
        label_smoothing=loss.label_smoothing,
    )
    return _loss_from_stats(loss, stats, batch, norms)


def _token_stats(
    model: T5, loss: LossConfig, params: Any, batch: Batch, rng: Array | None, with_negative: bool
) -> dict[str, Array]:
    """``losses.token_stats`` of one model call (all positions at once, or in chunks)."""
    chunked = loss.logits_chunk is not None
    pos, neg = _logits(model, params, batch, rng, with_negative, hidden=chunked)
    if not chunked:
        return losses.token_stats(
            pos, neg, batch[TARGETS], batch[WEIGHTS], label_smoothing=loss.label_smoothing
        )
    return _chunked_token_stats(
        model.config,
        params,
        pos,
        neg,
        batch[TARGETS],
        batch[WEIGHTS],
        loss.label_smoothing,
        loss.logits_chunk,
    )


def _loss(
    model: T5,
    loss: LossConfig,
    params: Any,
    batch: Batch,
    rng: Array | None,
    norms: tuple[Array, Array],
    reference: Any = None,
) -> tuple[Array, Metrics]:
    if loss.forward_passes == 2 or not loss.needs_negative:
        stats = _token_stats(model, loss, params, batch, rng, loss.needs_negative)
    else:
        # The released step: NLL and entropy from a first positive pass, p+ and p- from a
        # second positive pass and the negative pass, each with its own dropout mask.
        first_key, second_key = (None, None) if rng is None else jax.random.split(rng)
        first = _token_stats(model, loss, params, batch, first_key, False)
        second = _token_stats(model, loss, params, batch, second_key, True)
        stats = {**second, **{k: first[k] for k in ("nll", "entropy", "hits")}}
    value, metrics = _loss_from_stats(loss, stats, batch, norms)
    if loss.kl_coef:
        key = None if rng is None else jax.random.fold_in(rng, 3)
        kl = _reference_kl(model, params, reference, batch, key)
        value = value + loss.kl_coef * jnp.sum(kl) / jnp.maximum(norms[0], 1.0)
        metrics = {**metrics, "loss": value, "kl_sum": jnp.sum(kl)}
        metrics["kl_count"] = jnp.sum(jnp.sum(batch[WEIGHTS], -1) > 0).astype(jnp.float32)
    return value, metrics


def _reference_kl(model: T5, params: Any, reference: Any, batch: Batch, rng: Array | None) -> Array:
    """Per example ``[B]``: KL(reference || policy) summed over the vocabulary and the
    target tokens, both on the original-instruction input (policy with dropout when
    ``rng`` is given, the frozen reference without)."""
    if reference is None or not jax.tree.leaves(reference):
        raise ValueError("LossConfig.kl_coef needs the frozen reference in the train state")
    orig = {**batch, POS: batch[features.ENCODER_ORIG]}
    policy, _ = _logits(model, params, orig, rng, False)
    ref, _ = _logits(model, jax.lax.stop_gradient(reference), orig, None, False)
    log_p = jax.nn.log_softmax(jnp.asarray(policy, jnp.float32), -1)
    log_r = jax.nn.log_softmax(jnp.asarray(ref, jnp.float32), -1)
    per_token = jnp.sum(jnp.exp(log_r) * (log_r - log_p), -1)
    on = jnp.asarray(batch[WEIGHTS], jnp.float32) > 0
    return jnp.sum(jnp.where(on, per_token, 0.0), -1)


def _additive(metrics: Metrics) -> Metrics:
    """The entries that add up over microbatches: the loss and ``*_sum``/``*_count``."""
    return {k: v for k, v in metrics.items() if k == "loss" or k.endswith(("_sum", "_count"))}


def split_microbatches(batch: Batch, num_microbatches: int) -> dict[str, Array]:
    """``[B, ...]`` -> ``[k, B/k, ...]``; microbatch j holds examples ``i*k + j``.

    With the batch split over ``data`` in contiguous blocks, every device then holds
    ``B/(k*data)`` rows of each microbatch: no data moves between devices.
    """
    k = num_microbatches
    out = {}
    for key, x in batch.items():
        b = x.shape[0]
        if b % k:
            raise ValueError(f"batch[{key!r}] has {b} examples, not divisible by {k} microbatches")
        out[key] = x.reshape((b // k, k) + x.shape[1:]).swapaxes(0, 1)
    return out


def compute_gradients(
    model: T5,
    params: Any,
    batch: Batch,
    rng: Array | None,
    *,
    loss: LossConfig,
    num_microbatches: int = 1,
    partitioner: Partitioner | None = None,
    reference: Any = None,
) -> tuple[Any, Metrics]:
    """Gradients of the whole-batch loss and the summed (additive) metrics.

    Traceable (call under ``jit``). With ``num_microbatches = k > 1`` the batch is split
    by ``split_microbatches`` and the k gradients are summed in a ``lax.scan``; each
    microbatch's loss is normalised by the whole batch's counts, so the sum equals the
    one-batch gradient. ``rng`` (a typed key or None for no dropout) is folded with the
    microbatch index. Returned metrics hold ``loss`` and ``*_sum``/``*_count`` pairs;
    ``losses.finalize_metrics`` turns them into means.
    """
    batch = features.select(batch, loss)
    norms = losses.normalisers(batch[WEIGHTS])

    def loss_fn(p: Any, mb: Batch, key: Array | None) -> tuple[Array, Metrics]:
        value, metrics = _loss(model, loss, p, mb, key, norms, reference)
        return value, _additive(metrics)

    grad_sh = None if partitioner is None else partitioner.param_shardings(model.config)
    return accumulate_gradients(loss_fn, params, batch, rng, num_microbatches, partitioner, grad_sh)


def accumulate_gradients(
    loss_fn: Callable[[Any, Batch, Array | None], tuple[Array, Metrics]],
    params: Any,
    batch: Batch,
    rng: Array | None,
    num_microbatches: int = 1,
    partitioner: Partitioner | None = None,
    grad_shardings: Any = None,
) -> tuple[Any, Metrics]:
    """Gradients of ``loss_fn(params, batch, rng)`` and its additive metrics, summed over
    ``num_microbatches`` microbatches (``split_microbatches``) in a ``lax.scan``.

    ``loss_fn`` must normalise by the whole batch's counts (computed before the split),
    so that the sum equals the one-batch gradient; ``rng`` is folded with the microbatch
    index. ``grad_shardings`` (the parameters') keeps the accumulator sharded.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_microbatches == 1:
        (_, metrics), grads = grad_fn(params, batch, rng)
        return grads, metrics

    mbs = split_microbatches(batch, num_microbatches)
    if partitioner is not None:
        mb_size = next(iter(mbs.values())).shape[1]
        if mb_size % partitioner.data_size:
            raise PartitioningError(
                f"microbatch size {mb_size} (batch / {num_microbatches}) is not divisible by "
                f"mesh axis 'data' of size {partitioner.data_size} (mesh "
                f"{dict(partitioner.mesh.shape)}); use fewer microbatches or a larger batch"
            )
        mbs = jax.lax.with_sharding_constraint(
            mbs, NamedSharding(partitioner.mesh, PartitionSpec(None, "data"))
        )
    first = {k: v[0] for k, v in mbs.items()}
    metric_shapes = jax.eval_shape(lambda: loss_fn(params, first, rng)[1])
    zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
    zeros_g = jax.tree.map(jnp.zeros_like, params)
    if grad_shardings is not None:
        zeros_g = jax.lax.with_sharding_constraint(zeros_g, grad_shardings)

    def body(carry: tuple[Any, Metrics], xs: tuple[Batch, Array]) -> tuple[Any, None]:
        g_acc, m_acc = carry
        mb, i = xs
        key = None if rng is None else jax.random.fold_in(rng, i)
        (_, m), g = grad_fn(params, mb, key)
        return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, m_acc, m)), None

    (grads, metrics), _ = jax.lax.scan(
        body, (zeros_g, zeros_m), (mbs, jnp.arange(num_microbatches))
    )
    return grads, metrics


def _finalize(metrics: Metrics) -> Metrics:
    out = dict(losses.finalize_metrics(metrics))
    out["loss"] = metrics["loss"]
    out["num_examples"] = metrics.get("contrastive_count", jnp.float32(0))
    out["num_tokens"] = metrics.get("token_accuracy_count", jnp.float32(0))
    return out


# --------------------------------------------------------------------------- state creation


def _opt_init(optimizer: Optimizer | None, params: Any) -> Any:
    """The optimizer state of ``params``; none (an empty pytree) without an optimizer."""
    return optax.EmptyState() if optimizer is None else optimizer.tx.init(params)


def train_state_shardings(
    config: T5Config,
    optimizer: Optimizer | None,
    partitioner: Partitioner,
    extras: StateExtras | None = None,
) -> TrainState:
    """A ``TrainState`` of ``NamedSharding``s (jit in/out shardings, orbax restore targets).

    ``optimizer=None`` (a method that does not train): no optimizer state at all.
    ``extras``: the method's heads (replicated) and frozen reference (sharded like the
    parameters).
    """
    extras = extras or StateExtras()
    params_sh = partitioner.param_shardings(config)
    rep = partitioner.replicated
    head_shapes = extras.head_shapes(config)
    heads_sh = jax.tree.map(lambda _: rep, head_shapes)
    if optimizer is None:
        opt_sh: Any = optax.EmptyState()
    elif not jax.tree.leaves(head_shapes):
        opt_sh = partitioner.opt_state_shardings(optimizer.tx, config)
    else:
        opt_sh = partitioning.opt_state_shardings(
            optimizer.tx,
            trainable(param_shapes(config), head_shapes),
            trainable(params_sh, heads_sh),
            partitioner.mesh,
        )
    reference_sh = partitioner.param_shardings(config) if extras.reference else optax.EmptyState()
    return TrainState(
        step=rep, params=params_sh, opt_state=opt_sh, rng=rep, heads=heads_sh,
        reference=reference_sh,
    )  # fmt: skip


def abstract_train_state(
    config: T5Config,
    optimizer: Optimizer | None,
    partitioner: Partitioner,
    extras: StateExtras | None = None,
) -> TrainState:
    """``ShapeDtypeStruct``s with shardings for every state leaf (no memory allocated)."""
    extras = extras or StateExtras()
    shapes = param_shapes(config)
    head_shapes = extras.head_shapes(config)

    def build(params: Any, heads: Any) -> TrainState:
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=_opt_init(optimizer, trainable(params, heads)),
            rng=jax.random.key_data(jax.random.key(0)),
            heads=heads,
            reference=params if extras.reference else optax.EmptyState(),
        )

    abstract = jax.eval_shape(build, shapes, head_shapes)
    shardings = train_state_shardings(config, optimizer, partitioner, extras)
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def create_train_state(
    config: T5Config,
    params: Any,
    optimizer: Optimizer | None,
    partitioner: Partitioner,
    rng: Array,
    extras: StateExtras | None = None,
) -> TrainState:
    """A sharded ``TrainState`` at step 0: ``params`` placed on the mesh, optimizer state
    initialised directly in its sharded layout.

    Parameters are cast to ``config.param_dtype``: with bf16 parameters the AdamW
    moments are bf16 too (no fp32 master copy, as in the released code). Host (NumPy)
    parameters of that dtype are placed without an extra device copy; ``LazyTensor``
    leaves (``load_checkpoint(..., lazy=True)``) are read one addressable shard at a
    time. Device arrays are copied, so that the caller's stay valid: train steps donate
    the state (``device_put`` alone may alias a replicated shard to its source buffer).
    ``extras``: heads initialised from ``fold_in(rng, 1)``; the reference a copy of the
    parameters.
    """
    extras = extras or StateExtras()
    shardings = train_state_shardings(config, optimizer, partitioner, extras)
    on_device = any(isinstance(x, jax.Array) for x in jax.tree.leaves(params))
    params = lazy.place(params, shardings.params)
    dtype = jnp.dtype(config.param_dtype)
    if on_device or any(x.dtype != dtype for x in jax.tree.leaves(params)):
        # A copy (device arrays) and the configured parameter dtype (e.g. fp32 weights of
        # a checkpoint trained as bf16, as the released code does).
        convert = jax.jit(
            lambda tree: jax.tree.map(lambda x: jnp.copy(x).astype(dtype), tree),
            out_shardings=shardings.params,
        )
        params = convert(params)
    heads: Any = optax.EmptyState()
    if extras.heads is not None:
        key = jax.random.fold_in(rng, 1)
        init_heads = functools.partial(extras.heads, config)
        heads = jax.jit(init_heads, out_shardings=shardings.heads)(key)
    init = functools.partial(_opt_init, optimizer)
    opt_state = jax.jit(init, out_shardings=shardings.opt_state)(trainable(params, heads))
    state = TrainState(
        step=jax.device_put(np.zeros((), np.int32), shardings.step),
        params=params,
        opt_state=opt_state,
        rng=jax.device_put(_key_data(rng), shardings.rng),
        heads=heads,
    )
    return freeze_reference(state) if extras.reference else state


@jax.jit
def _copy_tree(tree: Any) -> Any:
    return jax.tree.map(jnp.copy, tree)


def freeze_reference(state: TrainState) -> TrainState:
    """``state`` with its reference set to a copy of its current parameters (the policy
    an RL method starts from, e.g. after a warm-up)."""
    return state.replace(reference=_copy_tree(state.params))


# --------------------------------------------------------------------------- train step


def make_train_step(
    model: T5,
    optimizer: Optimizer,
    partitioner: Partitioner,
    *,
    loss: LossConfig | None = None,
    num_microbatches: int = 1,
    donate: bool = True,
    extras: StateExtras | None = None,
) -> ShardedStep:
    """The jitted train step ``(state, batch) -> (new_state, metrics)``.

    In/out shardings come from the partitioner (state per ``train_state_shardings``,
    batch leading dim over ``data``, metrics replicated); the state argument is donated
    (``donate_argnums=0``), so do not reuse it after the call. Shapes are static: a new
    batch of the same shapes does not recompile. Dropout is on when
    ``model.config.dropout_rate > 0``, keyed by ``fold_in(state.rng, state.step)``.

    Metrics (scalars): ``loss``, ``nll``, ``contrastive``, ``entropy``, ``token_accuracy``,
    ``grad_norm``, ``learning_rate`` (the rate applied by this step), ``num_examples``,
    ``num_tokens``.
    """
    loss = LossConfig() if loss is None else loss
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
    config = model.config
    state_sh = train_state_shardings(config, optimizer, partitioner, extras)

    def step_fn(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        with partitioner.context():
            rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
            grads, summed = compute_gradients(
                model,
                state.params,
                batch,
                rng,
                loss=loss,
                num_microbatches=num_microbatches,
                partitioner=partitioner,
                reference=state.reference,
            )
            # A state with heads (an RL method's warm-up): the heads get zero gradients.
            zero_heads = jax.tree.map(jnp.zeros_like, state.heads)
            return apply_gradients(
                optimizer, state, trainable(grads, zero_heads), _finalize(summed)
            )

    return ShardedStep(jit_step(step_fn, state_sh, partitioner, donate), partitioner, loss)


def apply_gradients(
    optimizer: Optimizer, state: TrainState, grads: Any, metrics: Metrics
) -> tuple[TrainState, Metrics]:
    """One optimizer update of ``state.trainable()`` by ``grads`` (the same tree), and
    ``metrics`` with ``grad_norm`` and ``learning_rate`` (the rate this step applies)."""
    tree = state.trainable()
    updates, opt_state = optimizer.tx.update(grads, state.opt_state, tree)
    tree = optax.apply_updates(tree, updates)
    if jax.tree.leaves(state.heads):
        params, heads = tree["params"], tree["heads"]
    else:
        params, heads = tree, state.heads
    metrics = {**metrics, "grad_norm": optax.tree.norm(grads)}
    metrics["learning_rate"] = jnp.asarray(optimizer.learning_rate(state.step), jnp.float32)
    new_state = state.replace(step=state.step + 1, params=params, heads=heads, opt_state=opt_state)
    return new_state, metrics


def jit_step(
    step_fn: Callable, state_sh: TrainState, partitioner: Partitioner, donate: bool
) -> Any:
    """``jax.jit`` of a train step: state and batch in their shardings, metrics
    replicated, the state donated (``donate``)."""
    return jax.jit(
        step_fn,
        in_shardings=(state_sh, partitioner.batch_sharding),
        out_shardings=(state_sh, partitioner.replicated),
        donate_argnums=(0,) if donate else (),
    )


class ShardedStep:
    """A jitted function whose calls first keep the batch keys it needs and put them on
    the mesh (``shard_batch``).

    Host (numpy) and device arrays then reach the compiled function with the same
    sharding, and extra batch entries (metadata, unused inputs) are ignored, so neither
    changes the compiled signature. ``lower`` (ahead-of-time compilation on abstract
    shapes) and ``jitted`` expose the underlying ``jax.jit`` object.
    """

    def __init__(
        self,
        jitted: Any,
        partitioner: Partitioner,
        loss: LossConfig,
        keys: Sequence[str] | None = None,
    ) -> None:
        self.jitted = jitted
        self.partitioner = partitioner
        self.loss = loss
        self.keys = keys  # the batch entries read (default: what ``loss`` needs)

    def _inputs(self, batch: Batch) -> dict[str, Any]:
        if self.keys is None:
            return features.select(batch, self.loss)
        return features.pick(batch, self.keys)

    def __call__(self, first: Any, batch: Batch) -> Any:
        return self.jitted(first, self.partitioner.shard_batch(self._inputs(batch)))

    def lower(self, first: Any, batch: Batch) -> Any:
        """``jax.jit(...).lower``; accepts ``ShapeDtypeStruct``s (``abstract_train_state``)."""
        return self.jitted.lower(first, self._inputs(batch))

    def cache_size(self) -> int:
        """Number of compiled versions held (1 after any number of same-shape calls)."""
        return self.jitted._cache_size()


# --------------------------------------------------------------------------- evaluation


def make_eval_step(
    model: T5, partitioner: Partitioner, *, loss: LossConfig | None = None
) -> ShardedStep:
    """Jitted ``(params, batch) -> metrics`` without dropout or gradients.

    Returns additive entries (sum them over batches, then ``summarize_eval``): the loss
    terms' ``*_sum``/``*_count`` pairs, and for plain NLL under the positive instruction
    ``ll_sum``/``ll_count`` (token log-likelihood, token count) and
    ``example_nll_sum``/``example_nll_count`` (sum of per-example mean token NLL, number
    of examples; the released code's perplexity is ``exp`` of their ratio).
    """
    loss = LossConfig() if loss is None else loss
    params_sh = partitioner.param_shardings(model.config)

    def eval_fn(params: Any, b: Batch) -> Metrics:
        with partitioner.context():
            norms = losses.normalisers(b[WEIGHTS])
            pos_logits, neg_logits = _logits(model, params, b, None, loss.needs_negative)
            targets, weights = b[TARGETS], b[WEIGHTS]
            _, metrics = _loss_from_logits(loss, pos_logits, neg_logits, b, norms)
            out = _additive(metrics)
            ll = losses.sequence_log_likelihood(pos_logits, targets, weights)
            n = jnp.sum(jnp.asarray(weights, jnp.float32), -1)
            out["ll_sum"], out["ll_count"] = jnp.sum(ll), jnp.sum(n)
            out["example_nll_sum"] = jnp.sum(jnp.where(n > 0, -ll / jnp.where(n > 0, n, 1.0), 0.0))
            out["example_nll_count"] = jnp.sum(n > 0).astype(jnp.float32)
        return out

    jitted = jax.jit(
        eval_fn,
        in_shardings=(params_sh, partitioner.batch_sharding),
        out_shardings=partitioner.replicated,
    )
    return ShardedStep(jitted, partitioner, loss)


def summarize_eval(metrics: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Sum additive eval metrics over batches; means plus ``perplexity`` (released code:
    exp of the mean over examples of their mean token NLL) and ``token_perplexity``
    (exp of total NLL / total tokens)."""
    totals: dict[str, float] = {}
    for m in metrics:
        for k, v in jax.device_get(dict(m)).items():
            totals[k] = totals.get(k, 0.0) + float(np.asarray(v))
    out = {k: float(v) for k, v in losses.finalize_metrics(totals).items()}
    ex_n, tok_n = totals.get("example_nll_count", 0.0), totals.get("ll_count", 0.0)
    out["perplexity"] = float(np.exp(totals["example_nll_sum"] / ex_n)) if ex_n else float("nan")
    out["token_perplexity"] = float(np.exp(-totals["ll_sum"] / tok_n)) if tok_n else float("nan")
    return out


def make_score_fn(model: T5, partitioner: Partitioner) -> ShardedStep:
    """Jitted ``(params, batch) -> (log_likelihood [B], num_tokens [B])`` under the
    positive instruction (``encoder_pos_tokens``): log p(target | input) per example."""
    params_sh = partitioner.param_shardings(model.config)

    def score(params: Any, batch: Batch) -> tuple[Array, Array]:
        with partitioner.context():
            logits = model.apply({"params": params}, batch[POS], batch[DEC_IN])
            ll = losses.sequence_log_likelihood(logits, batch[TARGETS], batch[WEIGHTS])
            n = jnp.sum(jnp.asarray(batch[WEIGHTS], jnp.float32), -1)
        return ll, n

    jitted = jax.jit(
        score,
        in_shardings=(params_sh, partitioner.batch_sharding),
        out_shardings=partitioner.batch_sharding,
    )
    return ShardedStep(jitted, partitioner, nll_loss_config())

"""HIR losses: label-smoothed NLL, contrastive terms (binary and in-batch), entropy bonus.

Pure ``jnp`` functions of logits ``[batch, len, vocab]``, integer targets ``[batch, len]``
and float weights ``[batch, len]`` (0 on padding). Padding never contributes: masked
positions are removed with ``jnp.where`` (not multiplied by 0), and masked target ids are
replaced by 0 before the gather, so any logits or ids there (even ``-100``) are harmless.
Logits are cast to float32 first (the released code runs in bf16; we do the maths in fp32).

Normalisation (what ``hir_loss`` divides by)
--------------------------------------------
The released code trains with batch 1 per device and accumulates gradients, so its loss
is a *mean over examples of per-example terms*, each NLL/entropy term being the mean over
that example's own tokens. That is ``normalisation="example"`` (the default)::

    loss = sum_i [ nll_i / n_i + alpha * C_i - beta * H_i / n_i ] / num_examples

with ``nll_i``, ``H_i`` the token sums of example ``i``, ``n_i`` its token count (sum of its
weights) and ``num_examples`` the number of examples with ``n_i > 0``.
``normalisation="token"`` is the usual big-batch form (token sums over the whole batch
divided by the total token count; the contrastive term stays a mean over examples)::

    loss = sum nll / num_tokens + alpha * sum_i C_i / num_examples - beta * sum H / num_tokens

Gradient accumulation over k microbatches: compute the normalisers of the *whole* batch
once (``normalisers(weights)``) and pass them as ``num_examples=`` / ``num_tokens=`` to
``hir_loss`` for every microbatch. Each microbatch loss is then its exact share of the
big-batch loss, so summing the k losses (and their gradients) gives the big-batch loss
(and gradient) exactly; do not divide by k. Metrics: sum the ``*_sum`` and ``*_count``
entries of the microbatch metric dicts and call ``finalize_metrics``. Exception: the
in-batch contrastive term contrasts the examples of one call, so with microbatches its
negatives are those of the microbatch (inherent to InfoNCE).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp

Array = jax.Array
ContrastiveKind = Literal["binary", "in_batch", "none"]
Normalisation = Literal["example", "token"]

# The released code adds this inside the log of the binary contrastive term.
RELEASED_LOG_EPS = 1e-8


def _safe_div(num: Array, den: Array) -> Array:
    """num / den, 0 where den == 0, with finite gradients (no 0 * inf)."""
    den = jnp.asarray(den, jnp.float32)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def _masked(values: Array, weights: Array) -> Array:
    """values * weights, exactly 0 where weights == 0 whatever the values (NaN, inf)."""
    weights = jnp.asarray(weights, jnp.float32)
    return jnp.where(weights != 0, values * weights, 0.0)


def _log_probs(logits: Array) -> Array:
    return jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)


def _gather(log_probs: Array, targets: Array, weights: Array) -> Array:
    """log p(target) per position; masked ids are replaced by 0 so any id is safe."""
    ids = jnp.where(jnp.asarray(weights) != 0, targets, 0).astype(jnp.int32)
    return jnp.take_along_axis(log_probs, ids[..., None], axis=-1)[..., 0]


def _lsnll(log_probs: Array, targets: Array, weights: Array, epsilon: float) -> tuple[Array, Array]:
    nll = -_gather(log_probs, targets, weights)
    if epsilon:
        nll = (1.0 - epsilon) * nll + epsilon * -jnp.mean(log_probs, axis=-1)
    weights = jnp.asarray(weights, jnp.float32)
    return jnp.sum(_masked(nll, weights), -1), jnp.sum(weights, -1)


def _entropy(log_probs: Array, weights: Array) -> tuple[Array, Array]:
    ent = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
    weights = jnp.asarray(weights, jnp.float32)
    return jnp.sum(_masked(ent, weights), -1), jnp.sum(weights, -1)


def _seq_ll(log_probs: Array, targets: Array, weights: Array, mean: bool) -> Array:
    total = jnp.sum(_masked(_gather(log_probs, targets, weights), weights), -1)
    if not mean:
        return total
    return _safe_div(total, jnp.sum(jnp.asarray(weights, jnp.float32), -1))


def normalisers(weights: Array) -> tuple[Array, Array]:
    """(num_examples, num_tokens) of a batch: examples with any weight, and total weight.

    Compute these on the whole batch and pass them to every microbatch's ``hir_loss``.
    """
    weights = jnp.asarray(weights, jnp.float32)
    return jnp.sum(jnp.sum(weights, -1) > 0).astype(jnp.float32), jnp.sum(weights)


def token_log_likelihood(logits: Array, targets: Array, weights: Array) -> Array:
    """log p(target_t | ...) per position ``[B, L]``, 0 on padding."""
    return _masked(_gather(_log_probs(logits), targets, weights), weights)


def sequence_log_likelihood(logits: Array, targets: Array, weights: Array) -> Array:
    """Sum of token log-likelihoods per example ``[B]`` (log p(output | input))."""
    return _seq_ll(_log_probs(logits), targets, weights, mean=False)


def mean_token_log_likelihood(logits: Array, targets: Array, weights: Array) -> Array:
    """Per-example mean token log-likelihood ``[B]`` (0 for an all-padding row).

    This is minus the released code's per-example mean cross-entropy; exp of it is the
    geometric-mean token probability used by the binary contrastive term.
    """
    return _seq_ll(_log_probs(logits), targets, weights, mean=True)


def label_smoothed_nll(
    logits: Array, targets: Array, weights: Array, *, epsilon: float = 0.0
) -> tuple[Array, Array]:
    """Label-smoothed NLL: per-example token sums ``[B]`` and token counts ``[B]``.

    Per token: ``(1 - eps) * -log p(y) + eps * mean_v(-log p(v))``, the form of HF
    ``transformers.trainer_pt_utils.LabelSmoother`` that the released code uses (the
    uniform part is a mean over the full logits dimension, unused ids included; not
    fairseq's ``eps / (V - 1)`` variant). ``epsilon=0`` is the plain NLL.
    Divide the sums by the counts (or by a batch total) to normalise; see the module doc.
    """
    return _lsnll(_log_probs(logits), targets, weights, epsilon)


def entropy(logits: Array, weights: Array) -> tuple[Array, Array]:
    """Entropy of the predicted token distribution: per-example sums ``[B]`` and counts ``[B]``.

    The released code takes ``Categorical(logits).entropy().mean()`` under the positive
    instruction; with its batch of 1 (no padding) that is sum / count here.
    """
    return _entropy(_log_probs(logits), weights)


def token_accuracy(logits: Array, targets: Array, weights: Array) -> tuple[Array, Array]:
    """Weighted count of argmax hits per example ``[B]`` and token counts ``[B]``."""
    hits = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    weights = jnp.asarray(weights, jnp.float32)
    return jnp.sum(_masked(hits, weights), -1), jnp.sum(weights, -1)


def binary_contrastive(
    pos_score: Array,
    neg_score: Array,
    *,
    epsilon: float = 0.2,
    log_eps: float = RELEASED_LOG_EPS,
) -> Array:
    """Released-code contrastive term per example ``[B]``.

    ``pos_score``/``neg_score`` are the mean token log-likelihoods of the same output under
    the positive / negative instruction, so p+ = exp(pos_score), p- = exp(neg_score) and
    ``term = (1-eps) * -log(p+/(p+ + p-) + log_eps) + eps * -log(p-/(p+ + p-) + log_eps)``.
    p+/(p+ + p-) is computed as sigmoid(pos - neg) (no underflow). ``log_eps`` is the
    released code's 1e-8 inside the log; with ``log_eps=0`` it is the exact log-sigmoid.
    It is a cross-entropy against the soft label (1-eps, eps): it falls as p+ grows
    until p+/(p+ + p-) = 1-eps and rises beyond (with eps 0.2: pos - neg > log 4).
    """
    diff = jnp.asarray(pos_score, jnp.float32) - jnp.asarray(neg_score, jnp.float32)
    if log_eps:
        neg_log_pos = -jnp.log(jax.nn.sigmoid(diff) + log_eps)
        neg_log_neg = -jnp.log(jax.nn.sigmoid(-diff) + log_eps)
    else:
        neg_log_pos = -jax.nn.log_sigmoid(diff)
        neg_log_neg = -jax.nn.log_sigmoid(-diff)
    return (1.0 - epsilon) * neg_log_pos + epsilon * neg_log_neg


def in_batch_contrastive(scores: Array, valid: Array | None = None) -> Array:
    """Paper Eq. 4 (InfoNCE over the batch's instructions), per example ``[B]``.

    ``scores[i, k]`` = log-likelihood score of output i under instruction k (query i);
    the term for row i is ``-log softmax_k(scores[i, :])[i]`` over the valid k.
    ``valid`` (bool ``[B, B]`` or ``[B]`` per example) masks padding examples; a row whose
    diagonal is invalid gives 0. Sum (or average) the result over examples yourself.
    """
    scores = jnp.asarray(scores, jnp.float32)
    b = scores.shape[0]
    if valid is None:
        valid = jnp.ones((b, b), bool)
    valid = jnp.asarray(valid, bool)
    if valid.ndim == 1:
        valid = valid[:, None] & valid[None, :]
    row_ok = jnp.diagonal(valid)
    # Invalid rows see a row of zeros (finite logsumexp, zero gradient after the mask).
    masked = jnp.where(valid, scores, -jnp.inf)
    masked = jnp.where(row_ok[:, None], masked, 0.0)
    lse = jax.nn.logsumexp(masked, axis=-1)
    term = lse - jnp.diagonal(masked)
    return jnp.where(row_ok, term, 0.0)


def in_batch_scores_from_pos_neg(
    pos_score: Array, neg_score: Array, positive_is_correct: Array
) -> Array:
    """The ``[B, B]`` score matrix of ``in_batch_contrastive`` from two forward passes.

    HIR has two instruction classes ("correct" and "wrong") and each example's negative
    instruction is the other class, so output i under instruction k scores
    ``pos_score[i]`` when k's positive instruction is in i's class, else ``neg_score[i]``.
    (The released "Solve question with correct answer." and the paper's "Solve the
    question ..." both count as the "correct" class.) ``positive_is_correct`` is ``[B]``.
    """
    cls = jnp.asarray(positive_is_correct).astype(bool)
    same = cls[:, None] == cls[None, :]
    return jnp.where(same, jnp.asarray(pos_score)[:, None], jnp.asarray(neg_score)[:, None])


def finalize_metrics(metrics: Mapping[str, Array]) -> dict[str, Array]:
    """Turn (possibly summed over microbatches) ``X_sum``/``X_count`` pairs into means ``X``."""
    out = {}
    for key, value in metrics.items():
        if key.endswith("_sum"):
            name = key[: -len("_sum")]
            out[name] = _safe_div(jnp.asarray(value, jnp.float32), metrics[name + "_count"])
    return out


def token_stats(
    pos_logits: Array,
    neg_logits: Array | None,
    targets: Array,
    weights: Array,
    *,
    label_smoothing: float = 0.2,
) -> dict[str, Array]:
    """Per-example token sums ``[B]`` that every term of ``hir_loss`` is built from.

    ``nll`` (label-smoothed), ``entropy``, ``hits`` (argmax == target) and ``pos_ll``
    (and ``neg_ll`` with ``neg_logits``: log-likelihood of the target under the negative
    instruction). Being sums over positions, stats of slices of the sequence add up to
    the stats of the whole: that is what lets the train step compute the logits a slice
    at a time (``LossConfig.logits_chunk``).
    """
    weights = jnp.asarray(weights, jnp.float32)
    pos_lp = _log_probs(pos_logits)  # computed once: [B, L, V] float32
    stats = {
        "nll": _lsnll(pos_lp, targets, weights, label_smoothing)[0],
        "entropy": _entropy(pos_lp, weights)[0],
        "hits": token_accuracy(pos_logits, targets, weights)[0],
        "pos_ll": _seq_ll(pos_lp, targets, weights, mean=False),
    }
    if neg_logits is not None:
        stats["neg_ll"] = _seq_ll(_log_probs(neg_logits), targets, weights, mean=False)
    return stats


def hir_loss(
    pos_logits: Array,
    neg_logits: Array | None,
    targets: Array,
    weights: Array,
    *,
    label_smoothing: float = 0.2,
    **kwargs: Any,
) -> tuple[Array, dict[str, Array]]:
    """HIR loss = label-smoothed NLL + alpha * contrastive - beta * entropy.

    ``pos_logits``/``neg_logits``: decoder logits of the same target under the positive
    and negative instruction (``neg_logits`` may be None when ``contrastive="none"`` or
    ``alpha == 0``). NLL, entropy and token accuracy use ``pos_logits``. The other
    keywords are ``hir_loss_from_stats``'s (defaults: the released code).
    """
    stats = token_stats(pos_logits, neg_logits, targets, weights, label_smoothing=label_smoothing)
    return hir_loss_from_stats(stats, weights, **kwargs)


def hir_loss_from_stats(
    stats: Mapping[str, Array],
    weights: Array,
    *,
    contrastive: ContrastiveKind = "binary",
    contrastive_eps: float = 0.2,
    contrastive_log_eps: float = RELEASED_LOG_EPS,
    alpha: float = 1.0,
    beta: float = 0.001,
    normalisation: Normalisation = "example",
    in_batch_score: Literal["mean", "sum"] = "mean",
    positive_is_correct: Array | None = None,
    num_examples: Array | float | None = None,
    num_tokens: Array | float | None = None,
) -> tuple[Array, dict[str, Array]]:
    """``hir_loss`` from ``token_stats`` (of the whole sequence, or summed over slices).

    Defaults are the released code's (binary contrastive with eps 0.2, alpha 1, beta
    0.001, every term a per-example mean averaged over examples). ``in_batch`` needs
    ``positive_is_correct`` ``[B]`` and scores examples by their ``in_batch_score`` (mean
    or sum token log-likelihood). ``num_examples``/``num_tokens``: normalisers of the whole
    batch when this call is one microbatch (see the module doc); default: this batch's.

    Returns ``(loss, metrics)``: metrics hold ``loss``, the means ``nll``, ``contrastive``,
    ``entropy`` (positive: the entropy itself), ``token_accuracy`` over this call, and
    additive ``<name>_sum``/``<name>_count`` pairs for accumulation (``finalize_metrics``).
    """
    if contrastive not in ("binary", "in_batch", "none"):
        raise ValueError(f"contrastive must be 'binary', 'in_batch' or 'none', got {contrastive!r}")
    if normalisation not in ("example", "token"):
        raise ValueError(f"normalisation must be 'example' or 'token', got {normalisation!r}")
    if in_batch_score not in ("mean", "sum"):
        raise ValueError(f"in_batch_score must be 'mean' or 'sum', got {in_batch_score!r}")
    weights = jnp.asarray(weights, jnp.float32)
    n_i = jnp.sum(weights, -1)
    example_ok = (n_i > 0).astype(jnp.float32)
    own_examples, own_tokens = jnp.sum(example_ok), jnp.sum(n_i)
    num_examples = own_examples if num_examples is None else num_examples
    num_tokens = own_tokens if num_tokens is None else num_tokens
    nll_sum_i, ent_sum_i, hits_i = stats["nll"], stats["entropy"], stats["hits"]

    use_contrastive = contrastive != "none" and alpha != 0
    if use_contrastive:
        if "neg_ll" not in stats:
            raise ValueError(f"contrastive={contrastive!r} needs neg_logits")
        mean = contrastive == "binary" or in_batch_score == "mean"
        pos_s, neg_s = stats["pos_ll"], stats["neg_ll"]
        if mean:
            pos_s, neg_s = _safe_div(pos_s, n_i), _safe_div(neg_s, n_i)
        if contrastive == "binary":
            con_i = binary_contrastive(
                pos_s, neg_s, epsilon=contrastive_eps, log_eps=contrastive_log_eps
            )
        else:
            if positive_is_correct is None:
                raise ValueError("contrastive='in_batch' needs positive_is_correct [B]")
            scores = in_batch_scores_from_pos_neg(pos_s, neg_s, positive_is_correct)
            con_i = in_batch_contrastive(scores, example_ok > 0)
        con_i = jnp.where(example_ok > 0, con_i, 0.0)
    else:
        con_i = jnp.zeros_like(n_i)
    con_sum = jnp.sum(con_i)

    if normalisation == "example":
        nll_sum = jnp.sum(_safe_div(nll_sum_i, n_i))
        ent_sum = jnp.sum(_safe_div(ent_sum_i, n_i))
        term_count, term_norm = own_examples, num_examples
    else:
        nll_sum, ent_sum = jnp.sum(nll_sum_i), jnp.sum(ent_sum_i)
        term_count, term_norm = own_tokens, num_tokens
    loss = (
        _safe_div(nll_sum, term_norm)
        + alpha * _safe_div(con_sum, num_examples)
        - beta * _safe_div(ent_sum, term_norm)
    )
    metrics = {
        "loss": loss,
        "nll_sum": nll_sum,
        "nll_count": term_count,
        "contrastive_sum": con_sum,
        "contrastive_count": own_examples,
        "entropy_sum": ent_sum,
        "entropy_count": term_count,
        "token_accuracy_sum": jnp.sum(hits_i),
        "token_accuracy_count": own_tokens,
    }
    metrics.update(finalize_metrics(metrics))
    return loss, metrics


def nll_loss(
    logits: Array,
    targets: Array,
    weights: Array,
    *,
    label_smoothing: float = 0.0,
    normalisation: Normalisation = "example",
    num_examples: Array | float | None = None,
    num_tokens: Array | float | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Plain (optionally label-smoothed) NLL for the SFT and FARL baselines.

    Same as ``hir_loss`` with no contrastive term and ``beta = 0``; same metrics and
    normalisation rules.
    """
    return hir_loss(
        logits,
        None,
        targets,
        weights,
        label_smoothing=label_smoothing,
        contrastive="none",
        alpha=0.0,
        beta=0.0,
        normalisation=normalisation,
        num_examples=num_examples,
        num_tokens=num_tokens,
    )

"""hir_jax.losses against independent PyTorch / NumPy computations (HF LabelSmoother etc.)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.distributions import Categorical
from transformers.trainer_pt_utils import LabelSmoother

from hir_jax import losses

B, L, V = 5, 7, 13
LENGTHS = [7, 4, 1, 5, 0]  # the last example is all padding


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    pos = rng.normal(size=(B, L, V)).astype(np.float32) * 2.0
    neg = rng.normal(size=(B, L, V)).astype(np.float32) * 2.0
    targets = rng.integers(0, V, size=(B, L)).astype(np.int32)
    weights = np.zeros((B, L), np.float32)
    for i, n in enumerate(LENGTHS):
        weights[i, :n] = 1.0
    targets[weights == 0] = 0
    return pos, neg, targets, weights


def _scramble_padding(pos, neg, targets, weights, seed=1):
    """Arbitrary values wherever weights == 0 (huge logits, out-of-range / -100 ids)."""
    rng = np.random.default_rng(seed)
    pad = weights == 0
    pos, neg, targets = pos.copy(), neg.copy(), targets.copy()
    pos[pad] = rng.normal(size=(pad.sum(), V)) * 1e4
    neg[pad] = rng.normal(size=(pad.sum(), V)) * 1e4
    targets[pad] = rng.choice([-100, 3, V + 5], size=pad.sum())
    return pos, neg, targets


def _torch_released_example(pos, neg, tgt, eps=0.2, ceps=0.2, beta=0.001):
    """The released offline_trainer.py loss for one example (batch 1, no padding)."""
    pos_t = torch.tensor(pos)[None]
    neg_t = torch.tensor(neg)[None]
    lab = torch.tensor(tgt, dtype=torch.long)[None]
    loss = LabelSmoother(epsilon=eps)({"logits": pos_t}, lab)
    ce = torch.nn.CrossEntropyLoss(ignore_index=-100, reduction="none")
    pos_p = (-ce(pos_t.reshape(-1, V), lab.reshape(-1)).reshape(1, -1).mean(-1)).exp()
    neg_p = (-ce(neg_t.reshape(-1, V), lab.reshape(-1)).reshape(1, -1).mean(-1)).exp()
    pos_lp = -torch.log(pos_p / (pos_p + neg_p) + 1e-8)
    neg_lp = -torch.log(neg_p / (pos_p + neg_p) + 1e-8)
    con = (1 - ceps) * pos_lp + ceps * neg_lp
    ent = Categorical(logits=pos_t).entropy().mean()
    return loss.item(), con.item(), ent.item()


def test_label_smoothed_nll_matches_hf_label_smoother():
    pos, _, targets, weights = _batch()
    for eps in (0.0, 0.2):
        sums, counts = losses.label_smoothed_nll(pos, targets, weights, epsilon=eps)
        np.testing.assert_allclose(counts, LENGTHS)
        for i, n in enumerate(LENGTHS):
            if n == 0:
                assert float(sums[i]) == 0.0
                continue
            ref = LabelSmoother(epsilon=eps)(
                {"logits": torch.tensor(pos[i : i + 1, :n])},
                torch.tensor(targets[i : i + 1, :n], dtype=torch.long),
            )
            np.testing.assert_allclose(float(sums[i]) / n, ref.item(), rtol=1e-5)
        # Whole batch with -100 on padding == token-normalised sum.
        labels = torch.tensor(np.where(weights > 0, targets, -100), dtype=torch.long)
        ref = LabelSmoother(epsilon=eps)({"logits": torch.tensor(pos)}, labels)
        np.testing.assert_allclose(float(sums.sum() / counts.sum()), ref.item(), rtol=1e-5)


def test_entropy_mean_loglik_accuracy_match_torch_numpy():
    pos, _, targets, weights = _batch()
    ent_s, ent_n = losses.entropy(pos, weights)
    mll = losses.mean_token_log_likelihood(pos, targets, weights)
    sll = losses.sequence_log_likelihood(pos, targets, weights)
    hits, cnt = losses.token_accuracy(pos, targets, weights)
    ce = torch.nn.CrossEntropyLoss(reduction="none")
    for i, n in enumerate(LENGTHS):
        if n == 0:
            assert float(ent_s[i]) == float(mll[i]) == float(hits[i]) == 0.0
            continue
        logit = torch.tensor(pos[i, :n])
        ref_ent = Categorical(logits=logit).entropy().mean().item()
        np.testing.assert_allclose(float(ent_s[i] / ent_n[i]), ref_ent, rtol=1e-5)
        tok_ce = ce(logit, torch.tensor(targets[i, :n], dtype=torch.long))
        np.testing.assert_allclose(float(mll[i]), -tok_ce.mean().item(), rtol=1e-5)
        np.testing.assert_allclose(float(sll[i]), -tok_ce.sum().item(), rtol=1e-5)
        acc = (pos[i, :n].argmax(-1) == targets[i, :n]).sum()
        assert float(hits[i]) == acc and float(cnt[i]) == n


def test_binary_contrastive_matches_released_formula():
    rng = np.random.default_rng(3)
    pos_s = rng.uniform(-6, 0, size=8).astype(np.float32)
    neg_s = rng.uniform(-6, 0, size=8).astype(np.float32)
    got = losses.binary_contrastive(pos_s, neg_s, epsilon=0.2)
    p, n = np.exp(pos_s.astype(np.float64)), np.exp(neg_s.astype(np.float64))
    ref = 0.8 * -np.log(p / (p + n) + 1e-8) + 0.2 * -np.log(n / (p + n) + 1e-8)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    exact = losses.binary_contrastive(pos_s, neg_s, epsilon=0.2, log_eps=0.0)
    np.testing.assert_allclose(exact, 0.8 * -np.log(p / (p + n)) + 0.2 * -np.log(n / (p + n)), 1e-5)


def test_contrastive_lower_when_positive_likelihood_higher():
    neg_s = jnp.full((6,), -2.0)
    # With eps = 0.2 the term is a cross-entropy against the soft label (0.8, 0.2): it
    # falls while p+/(p+ + p-) < 0.8 (pos - neg < log 4) and is smallest there.
    pos_s = jnp.linspace(-5.0, -2.0 + np.log(4.0), 6)
    binary = np.asarray(losses.binary_contrastive(pos_s, neg_s))
    assert np.all(np.diff(binary) < 0)
    best = losses.binary_contrastive(jnp.array([np.log(4.0)]), jnp.array([0.0]))
    for d in (1.0, 1.3, 1.5, 3.0):
        assert float(losses.binary_contrastive(jnp.array([d]), jnp.array([0.0]))[0]) > best[0]
    pos_s = jnp.linspace(-5.0, 10.0, 6)
    plain = np.asarray(losses.binary_contrastive(pos_s, neg_s, epsilon=0.0, log_eps=0.0))
    assert np.all(np.diff(plain) < 0)
    cls = jnp.array([1, 1, 0, 1, 0, 0])
    base = np.asarray(
        losses.in_batch_contrastive(
            losses.in_batch_scores_from_pos_neg(jnp.full((6,), -2.0), neg_s - 1.0, cls)
        )
    )
    more = np.asarray(
        losses.in_batch_contrastive(
            losses.in_batch_scores_from_pos_neg(jnp.full((6,), -1.0), neg_s - 1.0, cls)
        )
    )
    assert np.all(more < base)


def test_in_batch_hand_computation():
    s = np.array([[0.0, -1.0, -2.0], [-3.0, -1.0, 0.0], [1.0, 1.0, 1.0]], np.float32)
    got = np.asarray(losses.in_batch_contrastive(s))
    e = np.exp
    hand = [
        -np.log(e(0.0) / (e(0.0) + e(-1.0) + e(-2.0))),
        -np.log(e(-1.0) / (e(-3.0) + e(-1.0) + e(0.0))),
        np.log(3.0),
    ]
    np.testing.assert_allclose(got, hand, rtol=1e-6)
    # Example 2 invalid: its row gives 0 and its column is left out of the others.
    got = np.asarray(losses.in_batch_contrastive(s, np.array([True, True, False])))
    hand = [-np.log(e(0.0) / (e(0.0) + e(-1.0))), -np.log(e(-1.0) / (e(-3.0) + e(-1.0))), 0.0]
    np.testing.assert_allclose(got, hand, rtol=1e-6)
    # Matrix from pos/neg: same class -> pos score of the row, other class -> neg score.
    m = losses.in_batch_scores_from_pos_neg(
        jnp.array([-1.0, -2.0, -3.0]), jnp.array([-4.0, -5.0, -6.0]), jnp.array([1, 0, 1])
    )
    np.testing.assert_array_equal(m, [[-1, -4, -1], [-5, -2, -5], [-3, -6, -3]])


def test_hir_loss_matches_released_per_example_loop():
    pos, neg, targets, weights = _batch()
    loss, metrics = losses.hir_loss(pos, neg, targets, weights)
    per = [
        _torch_released_example(pos[i, :n], neg[i, :n], targets[i, :n])
        for i, n in enumerate(LENGTHS)
        if n
    ]
    nll, con, ent = (np.mean([p[k] for p in per]) for k in range(3))
    np.testing.assert_allclose(float(loss), nll + con - 0.001 * ent, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["nll"]), nll, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["contrastive"]), con, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["entropy"]), ent, rtol=1e-5)
    acc = ((pos.argmax(-1) == targets) * weights).sum() / weights.sum()
    np.testing.assert_allclose(float(metrics["token_accuracy"]), acc, rtol=1e-6)
    assert float(metrics["loss"]) == float(loss)


def test_hir_loss_token_normalisation_and_in_batch():
    pos, neg, targets, weights = _batch()
    cls = np.array([1, 0, 1, 1, 0])
    loss, m = losses.hir_loss(
        pos,
        neg,
        targets,
        weights,
        contrastive="in_batch",
        positive_is_correct=cls,
        normalisation="token",
        alpha=0.5,
        beta=0.01,
        label_smoothing=0.1,
    )
    labels = torch.tensor(np.where(weights > 0, targets, -100), dtype=torch.long)
    nll = LabelSmoother(epsilon=0.1)({"logits": torch.tensor(pos)}, labels).item()
    mask = weights > 0
    ent = Categorical(logits=torch.tensor(pos[mask])).entropy().mean().item()

    # NumPy InfoNCE over the 4 valid examples, mean token log-likelihood as the score.
    def mll(lg):
        lp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
        tok = np.take_along_axis(lp, targets[..., None], -1)[..., 0]
        return (tok * weights).sum(-1) / np.maximum(weights.sum(-1), 1)

    ps, ns = mll(pos.astype(np.float64)), mll(neg.astype(np.float64))
    valid = [i for i, n in enumerate(LENGTHS) if n]
    terms = []
    for i in valid:
        row = np.array([ps[i] if cls[k] == cls[i] else ns[i] for k in valid])
        terms.append(-(ps[i] - np.log(np.exp(row).sum())))
    con = np.mean(terms)
    np.testing.assert_allclose(float(loss), nll + 0.5 * con - 0.01 * ent, rtol=1e-5)
    np.testing.assert_allclose(float(m["contrastive"]), con, rtol=1e-5)
    # Sum-of-log-likelihood scores (paper's P_ik as a sequence log-likelihood).
    _, m = losses.hir_loss(
        pos,
        neg,
        targets,
        weights,
        contrastive="in_batch",
        positive_is_correct=cls,
        in_batch_score="sum",
    )
    ps, ns = ps * weights.sum(-1), ns * weights.sum(-1)
    terms = []
    for i in valid:
        row = np.array([ps[i] if cls[k] == cls[i] else ns[i] for k in valid])
        terms.append(-(ps[i] - np.log(np.exp(row).sum())))
    np.testing.assert_allclose(float(m["contrastive"]), np.mean(terms), rtol=1e-5)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"normalisation": "token"},
        {"contrastive": "in_batch", "positive_is_correct": np.array([1, 0, 0, 1, 1])},
        {"contrastive": "none", "label_smoothing": 0.0},
    ],
)
def test_padding_values_do_not_matter(kw):
    pos, neg, targets, weights = _batch()
    loss, m = losses.hir_loss(pos, neg, targets, weights, **kw)
    pos2, neg2, targets2 = _scramble_padding(pos, neg, targets, weights)
    loss2, m2 = losses.hir_loss(pos2, neg2, targets2, weights, **kw)
    assert float(loss) == pytest.approx(float(loss2), rel=1e-6)
    for k in m:
        assert float(m[k]) == pytest.approx(float(m2[k]), rel=1e-6, abs=1e-7), k


@pytest.mark.parametrize("contrastive", ["binary", "in_batch", "none"])
def test_gradients_finite(contrastive):
    pos, neg, targets, weights = _batch()
    pos, neg, _ = _scramble_padding(pos, neg, targets, weights)
    pos[0, 0] *= 1e3  # a very confident token too
    cls = np.array([1, 0, 1, 1, 0])

    def f(p, n):
        return losses.hir_loss(
            p, n, targets, weights, contrastive=contrastive, positive_is_correct=cls
        )[0]

    gp, gn = jax.jit(jax.grad(f, argnums=(0, 1)))(jnp.asarray(pos), jnp.asarray(neg))
    assert np.all(np.isfinite(gp)) and np.all(np.isfinite(gn))
    assert np.all(np.asarray(gp)[weights == 0] == 0)
    assert np.abs(gp).sum() > 0


@pytest.mark.parametrize("normalisation", ["example", "token"])
def test_microbatches_with_global_normalisers_sum_to_big_batch(normalisation):
    pos, neg, targets, weights = _batch()
    ne, nt = losses.normalisers(weights)
    assert float(ne) == 4 and float(nt) == sum(LENGTHS)

    @jax.jit
    def value_and_grad(p, n, t, w, num_examples=None, num_tokens=None):
        def f(p):
            return losses.hir_loss(
                p,
                n,
                t,
                w,
                normalisation=normalisation,
                num_examples=num_examples,
                num_tokens=num_tokens,
            )

        return jax.value_and_grad(f, has_aux=True)(p)

    (full, full_m), g_full = value_and_grad(pos, neg, targets, weights)
    total, grads, acc = 0.0, [], {}
    for sl in (slice(0, 2), slice(2, 5)):
        (part, m), g = value_and_grad(pos[sl], neg[sl], targets[sl], weights[sl], ne, nt)
        total += float(part)
        grads.append(g)
        for k, v in m.items():
            if k.endswith(("_sum", "_count")):
                acc[k] = acc.get(k, 0.0) + v
    np.testing.assert_allclose(total, float(full), rtol=1e-6)
    np.testing.assert_allclose(np.concatenate(grads), g_full, rtol=1e-5, atol=1e-9)
    fin = losses.finalize_metrics(acc)
    for k in ("nll", "contrastive", "entropy", "token_accuracy"):
        np.testing.assert_allclose(float(fin[k]), float(full_m[k]), rtol=1e-6)


def test_nll_loss_is_plain_cross_entropy():
    pos, _, targets, weights = _batch()
    loss, m = losses.nll_loss(pos, targets, weights, normalisation="token")
    labels = torch.tensor(np.where(weights > 0, targets, -100), dtype=torch.long)
    ref = torch.nn.functional.cross_entropy(torch.tensor(pos).reshape(-1, V), labels.reshape(-1))
    np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-5)
    same, _ = losses.hir_loss(
        pos,
        None,
        targets,
        weights,
        label_smoothing=0.0,
        contrastive="none",
        beta=0.0,
        normalisation="token",
    )
    assert float(same) == float(loss)
    assert float(m["contrastive"]) == 0.0


def test_bad_options_raise():
    pos, neg, targets, weights = _batch()
    with pytest.raises(ValueError, match="contrastive"):
        losses.hir_loss(pos, neg, targets, weights, contrastive="nope")
    with pytest.raises(ValueError, match="neg_logits"):
        losses.hir_loss(pos, None, targets, weights)
    with pytest.raises(ValueError, match="positive_is_correct"):
        losses.hir_loss(pos, neg, targets, weights, contrastive="in_batch")

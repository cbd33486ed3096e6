"""PPO and GRPO: advantages against an independent computation, the clipped losses by
hand, KL to the frozen reference, resume after SIGTERM, and learning on pet_rule."""

from __future__ import annotations

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from run_py_helpers import TIMING, metric_lines

from hir_jax import advantages, features, metrics_log, rl_losses, runner
from hir_jax.checkpoints.state import checkpoint_id
from hir_jax.loop import LoopConfig
from hir_jax.methods import GRPO, PPO, Sample
from hir_jax.methods.rl import rewards
from hir_jax.model.configs import get_config
from hir_jax.model.t5 import T5, init_params
from hir_jax.partitioning import make_partitioner
from hir_jax.preemption import Preempted, Preemption
from hir_jax.train import LossConfig, create_train_state, make_optimizer
from tasks import vocab as vocab_lib

# --------------------------------------------------------------------------- advantages


def _gae_by_hand(rewards_row, values_row, gamma, lam):
    """GAE of one episode (lists of its actions only), the textbook recursion."""
    n = len(rewards_row)
    adv = [0.0] * n
    for t in range(n):  # forward sums, not the backward recursion the library uses
        total = 0.0
        for k in range(t, n):
            v_next = values_row[k + 1] if k + 1 < n else 0.0
            delta = rewards_row[k] + gamma * v_next - values_row[k]
            total += (gamma * lam) ** (k - t) * delta
        adv[t] = total
    return adv


def test_gae_returns_and_whitening_equal_an_independent_computation():
    rng = np.random.default_rng(0)
    lengths = [4, 2, 6, 1]  # row 1: padded after 2 actions; row 2: cut at the limit (6)
    n, length = len(lengths), 6
    mask = np.zeros((n, length))
    for i, m in enumerate(lengths):
        mask[i, :m] = 1
    logp, ref = rng.normal(size=(n, length)), rng.normal(size=(n, length))
    values = rng.normal(size=(n, length)) * 100 * (1 - mask) + rng.normal(size=(n, length)) * mask
    scores = np.array([1.0, 0.0, 0.0, 1.0])  # row 2 has no EOS: the reward gives 0
    beta, gamma, lam = 0.1, 0.9, 0.95

    r, kl = advantages.kl_rewards(logp, ref, scores, mask, beta)
    adv, ret = advantages.gae(r, values, mask, gamma, lam)
    white = advantages.masked_whiten(adv, mask)

    all_adv = []
    for i, m in enumerate(lengths):
        rew = [-beta * (logp[i, t] - ref[i, t]) for t in range(m)]
        rew[-1] += scores[i]
        np.testing.assert_allclose(r[i, :m], rew, rtol=1e-12)
        np.testing.assert_allclose(kl[i, :m], logp[i, :m] - ref[i, :m], rtol=1e-12)
        expected = _gae_by_hand(rew, list(values[i, :m]), gamma, lam)
        np.testing.assert_allclose(adv[i, :m], expected, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(ret[i, :m], np.array(expected) + values[i, :m], rtol=1e-10)
        all_adv += expected
        # Nothing leaks into the padding (the huge values there are ignored).
        assert not np.any(r[i, m:]) and not np.any(adv[i, m:]) and not np.any(ret[i, m:])
    flat = np.array(all_adv)
    expected_white = (flat - flat.mean()) / np.sqrt(flat.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(white[mask > 0], expected_white, rtol=1e-10)
    assert not np.any(white[mask == 0])


def test_grpo_group_advantages_and_rewards():
    scores = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5])
    groups = [0, 0, 0, 1, 1, 1, 2]
    adv = advantages.group_advantages(scores, groups)
    s = scores[:3]
    np.testing.assert_allclose(adv[:3], (s - s.mean()) / (s.std(ddof=1) + 1e-4))
    assert np.all(adv[3:6] == 0)  # all rewards equal
    assert adv[6] == 0  # a group of one
    items = [Sample(0, (5,), True), Sample(0, (5,), True, finished=False), Sample(1, (), False)]
    assert rewards(items, "judge").tolist() == [1.0, 0.0, 0.0]
    assert rewards(items, "constant").tolist() == [1.0, 1.0, 1.0]


def test_adaptive_kl_controller():
    ctl = advantages.KLController(0.2, target=6.0, horizon=1000)
    assert ctl.update(0.2, 12.0, 100) == pytest.approx(0.2 * (1 + 0.2 * 0.1))  # clipped error
    assert ctl.update(0.2, 6.0, 100) == pytest.approx(0.2)
    assert ctl.update(0.2, 5.4, 100) == pytest.approx(0.2 * (1 - 0.1 * 0.1))
    assert ctl.update(0.2, 0.0, 100) == pytest.approx(0.2 * (1 - 0.2 * 0.1))  # clipped
    assert advantages.KLController(0.2, target=None).update(0.2, 100.0, 100) == 0.2


# --------------------------------------------------------------------------- losses


def test_clipped_losses_by_hand():
    #          inside clip | ratio above clip, A > 0 | ratio below clip, A < 0 | pad
    logp = jnp.log(jnp.array([[1.1, 1.5, 0.5, 3.0]]))
    old = jnp.zeros((1, 4))
    adv = jnp.array([[2.0, 1.0, -1.0, 9.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    loss, active = rl_losses.clipped_policy_loss(logp, old, adv, mask, 0.2)
    # max(-A r, -A clip(r)): -2.2; max(-1.5, -1.2) = -1.2 (clipped); max(0.5, 0.8) = 0.8.
    np.testing.assert_allclose(loss, [[-2.2, -1.2, 0.8, 0.0]], rtol=1e-6)
    assert active.tolist() == [[0.0, 1.0, 1.0, 0.0]]

    v = jnp.array([[1.0, 0.5, -1.0, 7.0]])
    v_old = jnp.array([[0.9, 0.0, 0.0, 0.0]])
    ret = jnp.array([[1.2, 1.0, 0.0, 0.0]])
    vl = rl_losses.clipped_value_loss(v, v_old, ret, mask, 0.2)
    # v inside the clip: 0.5*(1-1.2)^2; v=0.5 clipped to 0.2: max(0.25, 0.64)/2;
    # v=-1 clipped to -0.2: max(1, 0.04)/2.
    np.testing.assert_allclose(vl, [[0.5 * 0.04, 0.5 * 0.64, 0.5 * 1.0, 0.0]], rtol=1e-5)

    ref = jnp.log(jnp.array([[0.5, 0.25, 0.5, 0.1]]))
    k3 = rl_losses.k3_kl(jnp.log(jnp.array([[0.5, 0.5, 0.25, 0.9]])), ref, mask)
    np.testing.assert_allclose(k3, [[0.0, 0.5 - np.log(0.5) - 1, 2.0 - np.log(2.0) - 1, 0.0]])


# --------------------------------------------------------------------------- KL to the reference


def test_kl_to_the_reference_is_zero_until_the_first_update():
    config = get_config("tiny", vocab_size=64)
    part = make_partitioner(data=1, devices=jax.devices()[:1])
    method = PPO()
    opt = make_optimizer(learning_rate=1e-2)
    state = create_train_state(
        config, init_params(config, jax.random.key(0)), opt, part, jax.random.key(1),
        method.state_extras(),
    )  # fmt: skip
    model = T5(config)
    scorer = method.make_scorer(model, part)
    rng = np.random.default_rng(0)
    targets = rng.integers(2, 60, (8, 6)).astype(np.int32)
    weights = np.ones((8, 6), np.float32)
    weights[::2, 4:] = 0
    targets = targets * weights.astype(np.int32)
    batch = {
        features.ENCODER_POS: rng.integers(2, 60, (8, 10)).astype(np.int32),
        features.DECODER_INPUT: np.concatenate([np.zeros((8, 1), np.int32), targets[:, :-1]], 1),
        features.DECODER_TARGET: targets,
        features.DECODER_WEIGHTS: weights,
    }
    first = scorer(state, batch)
    np.testing.assert_array_equal(first["logprobs"], first["ref_logprobs"])
    assert np.all(first["values"][weights == 0] == 0)
    items = [Sample(0, tuple(t[w > 0][:-1]), bool(i % 2)) for i, (t, w) in
             enumerate(zip(targets, weights, strict=True))]  # fmt: skip
    lengths = weights.sum(1).astype(int)
    per_row = [{k: v[i, : lengths[i]] for k, v in first.items()} for i in range(8)]
    annotations, next_state, metrics = method.annotate(items, per_row, {})
    assert metrics["rollout_kl"] == 0.0 and next_state["kl_coef"] < method.kl_coef
    train = features.add_token_features(batch, annotations)
    step = method.make_train_step(model, opt, part, method.loss(LossConfig()), 1)
    state, m = step(state, train)
    # The first step's ratio is exactly 1 (no dropout): nothing is clipped.
    assert float(m["clip_fraction"]) == 0.0 and float(m["approx_kl"]) == 0.0
    after = scorer(state, batch)
    np.testing.assert_array_equal(after["ref_logprobs"], first["ref_logprobs"])
    diff = (after["logprobs"] - after["ref_logprobs"])[weights > 0]
    assert np.abs(diff).max() > 1e-4
    k3 = rl_losses.k3_kl(after["logprobs"], after["ref_logprobs"], weights)
    assert float(jnp.sum(k3)) > 0


# --------------------------------------------------------------------------- loop runs


@pytest.fixture(scope="module")
def vocab(bigbench_dir):
    return vocab_lib.get_vocabulary(vocab_size=1024)


def _run(model_dir, vocab, method, *, num_rounds=2, **loop_kw):
    loop = dict(
        num_rounds=num_rounds, samples_per_query=4, max_new_tokens=5, eval_max_new_tokens=5,
        epochs=4, batch_size=32, sample_batch_size=128, eval_batch_size=32,
        warmup_task="hat_guess", warmup_epochs=6,
    )  # fmt: skip
    loop.update(loop_kw)
    return runner.run(
        model_dir=str(model_dir),
        task="pet_rule",
        spec=runner.setup(
            method=method,
            model_name="flan_t5_tiny",
            model_config=get_config("tiny", vocab_size=vocab.vocab_size),
            vocabulary=lambda: vocab,
            loop=LoopConfig(**loop),
            optimizer=make_optimizer(learning_rate=1e-3),
            partitioner=make_partitioner(data=1, devices=jax.devices()[:1]),
        ),
    )


def _accuracies(model_dir):
    return [r["accuracy"] for r in metrics_log.read_metrics(model_dir) if r["split"] == "test"]


@pytest.mark.parametrize("method", [PPO(), GRPO(epochs=4)], ids=["ppo", "grpo"])
def test_rl_learns_the_rule_and_not_from_a_constant_reward(tmp_path, vocab, method):
    import dataclasses

    _run(tmp_path / "judge", vocab, method)
    _run(tmp_path / "constant", vocab, dataclasses.replace(method, reward="constant"))
    learned, constant = _accuracies(tmp_path / "judge"), _accuracies(tmp_path / "constant")
    print(f"{method.name}: test accuracy by round {learned}; constant reward {constant}")
    assert learned[0] == constant[0] < 0.4, (learned, constant)  # the same warm-up, ~chance
    assert learned[-1] >= learned[0] + 0.25, learned
    assert max(constant) <= constant[0] + 0.1, constant
    first = [r for r in metrics_log.read_metrics(tmp_path / "judge") if r["split"] == "train"][1]
    assert first["new_samples"] == first["buffer_size"] == 4 * 120  # N_train x K, no replay


def test_ppo_resumes_after_sigterm_mid_round(tmp_path, vocab, monkeypatch):
    kw = dict(num_rounds=1, max_train_examples=24, max_test_examples=8, batch_size=8,
              warmup_epochs=1, checkpoint_every_steps=5)  # fmt: skip
    full = _run(tmp_path / "full", vocab, PPO(), **kw)

    original, calls = Preemption.should_stop, []

    def sigterm_at_step(self):
        # A real SIGTERM at round 1's 14th train step (after its sampling batch), past
        # the checkpoint of step 10: the resumed round reads its rollout values back.
        if any(r["split"] == "test" for r in metrics_log.read_metrics(tmp_path / "cut")):
            calls.append(1)
            if len(calls) == 15:
                os.kill(os.getpid(), signal.SIGTERM)
        return original(self)

    with monkeypatch.context() as patch:
        patch.setattr(Preemption, "should_stop", sigterm_at_step)
        with pytest.raises(Preempted):
            _run(tmp_path / "cut", vocab, PPO(), **kw)
    saved = sorted(int(p.name) for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert saved[-1] == checkpoint_id(1, 14), saved
    resumed = _run(tmp_path / "cut", vocab, PPO(), **kw)

    def strip(d):
        return {k: v for k, v in d.items() if k not in TIMING}

    assert strip(resumed) == strip(full)
    assert metric_lines(tmp_path / "cut") == metric_lines(tmp_path / "full")

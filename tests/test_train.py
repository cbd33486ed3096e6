"""Train step: accumulation equality, HF PyTorch parity, 8-device vs 1-device, no recompiles."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hir_jax import losses, train
from hir_jax import partitioning as part
from hir_jax.checkpoints import hf_name_map, load_hf, unflatten
from hir_jax.model.configs import get_config
from hir_jax.model.t5 import T5, init_params

TINY = get_config("tiny")


def _one_device() -> part.Partitioner:
    return part.make_partitioner(1, 1, devices=jax.devices()[:1])


def _init(config, seed=0):
    return jax.jit(lambda r: init_params(config, r))(jax.random.key(seed))


def hir_batch(seed: int, vocab: int, b: int = 8, enc_len: int = 12, dec_len: int = 7) -> dict:
    """A batch with padding in both encoders and the decoder, and one all-padding row."""
    rng = np.random.default_rng(seed)
    pos = rng.integers(2, vocab, (b, enc_len)).astype(np.int32)
    neg = rng.integers(2, vocab, (b, enc_len)).astype(np.int32)
    tgt = rng.integers(2, vocab, (b, dec_len)).astype(np.int32)
    w = np.ones((b, dec_len), np.float32)
    for i in range(1, b):
        pos[i, enc_len - i :] = 0
        neg[i, enc_len - (i + 1) // 2 :] = 0
        w[i, max(1, dec_len - i) :] = 0
    w[b - 1] = 0  # an example with no target tokens (a padding row)
    tgt[w == 0] = 0
    dec = np.concatenate([np.zeros((b, 1), np.int32), tgt[:, :-1]], 1)
    return {
        "encoder_pos_tokens": pos,
        "encoder_neg_tokens": neg,
        "decoder_input_tokens": dec,
        "decoder_target_tokens": tgt,
        "decoder_loss_weights": w,
        "positive_is_correct": (np.arange(b) % 3 == 0),
    }


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _max_tree_rel(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(_rel, jax.device_get(a), jax.device_get(b))))


# --------------------------------------------------------------------------- accumulation


def test_hir_loss_wiring_and_microbatch_accumulation():
    """The interleaved pos/neg forward gives the loss of two separate model calls, and
    4 microbatches give the gradient of the whole batch (example-normalised HIR loss)."""
    params = _init(TINY, 1)
    batch = hir_batch(1, TINY.vocab_size)
    cfg = train.LossConfig()
    model = T5(TINY)

    @jax.jit
    def one_batch(params, batch):
        grads, metrics = train.compute_gradients(model, params, batch, None, loss=cfg)
        dec = batch["decoder_input_tokens"]
        pos = model.apply({"params": params}, batch["encoder_pos_tokens"], dec)
        neg = model.apply({"params": params}, batch["encoder_neg_tokens"], dec)
        _, ref = losses.hir_loss(
            pos, neg, batch["decoder_target_tokens"], batch["decoder_loss_weights"]
        )
        return grads, metrics, ref

    accumulated = jax.jit(
        lambda p, b: train.compute_gradients(model, p, b, None, loss=cfg, num_microbatches=4)
    )
    g1, m1, ref = one_batch(params, batch)
    g4, m4 = accumulated(params, batch)
    assert float(ref["contrastive"]) > 0.1 and float(optax.tree.norm(g1)) > 0.1
    for key in ("loss", "nll_sum", "contrastive_sum", "entropy_sum", "token_accuracy_sum"):
        np.testing.assert_allclose(m1[key], ref[key], rtol=2e-6, err_msg=key)
    assert _max_tree_rel(g4, g1) <= 1e-5
    for key in m1:
        np.testing.assert_allclose(m4[key], m1[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize(
    "config, loss_kw, chunk",
    [
        (get_config("tiny", dropout_rate=0.1), {}, 3),  # 7 positions: 3 + 3 + 1 (padded)
        (TINY, {"contrastive": "in_batch", "normalisation": "token"}, 7),
        (get_config("tiny", tie_word_embeddings=True, feed_forward_proj="relu"), {}, 2),
        (TINY, {"kind": "nll", "label_smoothing": 0.1}, 4),
    ],
    ids=["hir-dropout", "in-batch-token", "tied-v1_0", "nll"],
)
def test_chunked_logits_give_the_same_loss_and_gradients(config, loss_kw, chunk):
    params = _init(config, 2)
    batch = hir_batch(2, config.vocab_size)
    model = T5(config)
    rng = jax.random.key(7) if config.dropout_rate else None

    def grads(loss):
        fn = jax.jit(lambda p, b: train.compute_gradients(model, p, b, rng, loss=loss))
        return fn(params, batch)

    g_full, m_full = grads(train.LossConfig(**loss_kw))
    g_chunk, m_chunk = grads(train.LossConfig(**loss_kw, logits_chunk=chunk))
    assert float(optax.tree.norm(g_full)) > 0.1
    assert _max_tree_rel(g_chunk, g_full) <= 1e-5
    for key in m_full:
        np.testing.assert_allclose(m_chunk[key], m_full[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_chunked_logits_hold_less_memory():
    """The compiled step's temporaries shrink when the logits come a slice at a time."""
    config = get_config("tiny", vocab_size=4096)
    params = _init(config)
    batch = hir_batch(3, config.vocab_size, b=8, enc_len=16, dec_len=64)
    model = T5(config)

    def temp_bytes(loss):
        fn = jax.jit(lambda p, b: train.compute_gradients(model, p, b, None, loss=loss))
        return fn.lower(params, batch).compile().memory_analysis().temp_size_in_bytes

    full = temp_bytes(train.LossConfig())
    chunked = temp_bytes(train.LossConfig(logits_chunk=16))
    logits_bytes = 2 * 8 * 64 * config.vocab_size * 4  # pos + neg logits, float32
    assert full > logits_bytes
    assert chunked < full / 2, (chunked, full)


def test_nll_token_normalised_accumulation_equals_one_batch():
    """Token normalisation over microbatches of unequal token counts (the case a
    per-microbatch mean gets wrong)."""
    params = _init(TINY, 2)
    batch = hir_batch(2, TINY.vocab_size)
    cfg = train.nll_loss_config(label_smoothing=0.1, normalisation="token")
    model = T5(TINY)
    fn = jax.jit(
        lambda p, b, k: train.compute_gradients(model, p, b, None, loss=cfg, num_microbatches=k),
        static_argnums=2,
    )
    (g1, m1), (g2, m2) = fn(params, batch, 1), fn(params, batch, 2)
    assert _max_tree_rel(g2, g1) <= 1e-5
    for key in m1:
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # Normalising each microbatch by its own token count would not match.
    counts = [batch["decoder_loss_weights"][j::2].sum() for j in range(2)]
    assert counts[0] != counts[1]


# --------------------------------------------------------------------------- HF parity

LR, WD, EPS = 1e-2, 0.1, 1e-6
HF_CONFIG = dict(
    vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2, num_decoder_layers=2,
    feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
    decoder_start_token_id=0,
)  # fmt: skip


def _to_ours(named: dict[str, np.ndarray], config) -> dict:
    """HF tensors (weights or gradients) -> our parameter tree, by the loader's name map."""
    flat = {}
    for ours, (hf_name, transpose) in hf_name_map(config).items():
        arr = np.asarray(named[hf_name], np.float32)
        flat[ours] = np.ascontiguousarray(arr.T) if transpose else arr
    return unflatten(flat)


def _nll_batch(
    seed: int, vocab: int = 128, b: int = 4, enc_len: int = 10, dec_len: int = 7
) -> dict:
    full = hir_batch(seed, vocab, b, enc_len, dec_len)
    return {k: v for k, v in full.items() if k not in ("encoder_neg_tokens", "positive_is_correct")}


def _torch_loss(model, batch):
    import torch

    enc = torch.from_numpy(batch["encoder_pos_tokens"].astype(np.int64))
    labels = np.where(batch["decoder_loss_weights"] > 0, batch["decoder_target_tokens"], -100)
    out = model(
        input_ids=enc,
        attention_mask=(enc != 0).long(),
        labels=torch.from_numpy(labels.astype(np.int64)),
    )
    return out.loss


def _no_bias_correction_adam(eps: float) -> optax.GradientTransformation:
    def init(params):
        return (jax.tree.map(jnp.zeros_like, params), jax.tree.map(jnp.zeros_like, params))

    def update(g, state, params=None):
        m = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, state[0], g)
        v = jax.tree.map(lambda v, g: 0.999 * v + 0.001 * g * g, state[1], g)
        return jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), m, v), (m, v)

    return optax.GradientTransformation(init, update)


def test_training_matches_hf_pytorch(tmp_path):
    os.environ.setdefault("USE_TF", "0")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**HF_CONFIG)).eval()
    with torch.no_grad():  # distinctive norms and position tables, so that swaps show
        for name, p in hf.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.normal_(0.0, 1.0)
    hf.save_pretrained(str(tmp_path))
    config, params = load_hf(tmp_path)
    config = config.replace(dropout_rate=0.0)
    params = jax.tree.map(jnp.asarray, params)
    model = T5(config)
    loss_cfg = train.nll_loss_config(normalisation="token")  # HF: mean over non-pad tokens
    batches = [_nll_batch(s) for s in range(3)]

    # 1. Gradients of the same loss match torch autograd.
    grad_fn = jax.jit(lambda p, b: train.compute_gradients(model, p, b, None, loss=loss_cfg))
    grads, metrics = grad_fn(params, batches[0])
    hf.zero_grad()
    hf_loss = _torch_loss(hf, batches[0])
    hf_loss.backward()
    np.testing.assert_allclose(float(metrics["loss"]), float(hf_loss.detach()), rtol=1e-5)
    hf_grads = _to_ours({n: p.grad.numpy() for n, p in hf.named_parameters()}, config)
    assert _max_tree_rel(grads, hf_grads) <= 1e-4

    # 2. A few AdamW steps (decoupled decay, norms exempt as in the released code).
    hf_run = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    named = list(hf_run.named_parameters())
    groups = [
        {"params": [p for n, p in named if "layer_norm.weight" not in n], "weight_decay": WD},
        {"params": [p for n, p in named if "layer_norm.weight" in n], "weight_decay": 0.0},
    ]
    torch_opt = torch.optim.AdamW(groups, lr=LR, eps=EPS)
    step_grads = []
    for b in batches:
        torch_opt.zero_grad()
        _torch_loss(hf_run, b).backward()
        step_grads.append(_to_ours({n: p.grad.numpy().copy() for n, p in named}, config))
        torch_opt.step()
    torch_params = _to_ours({n: p.detach().numpy() for n, p in named}, config)
    # Where a gradient is near 0, Adam's update is sign-like and amplifies rounding noise.
    min_grad = jax.tree.map(lambda *g: np.min(np.abs(np.stack(g)), 0), *step_grads)

    def error(final) -> float:
        """Max |our update - torch update| over well-conditioned entries, in units of lr."""
        errs = jax.tree.map(
            lambda f, t, p0, g: np.max(np.abs((f - p0) - (t - p0))[g > 1e-5], initial=0.0) / LR,
            jax.device_get(final), torch_params, jax.device_get(params), min_grad,
        )  # fmt: skip
        return max(jax.tree.leaves(errs))

    p1 = _one_device()
    opt = train.make_optimizer(learning_rate=LR, weight_decay=WD, eps=EPS)
    state = train.create_train_state(config, params, opt, p1, jax.random.key(0))
    step = train.make_train_step(model, opt, p1, loss=loss_cfg)
    for b in batches:
        state, m = step(state, b)
    assert int(state.step) == 3 and float(m["learning_rate"]) == pytest.approx(LR)
    tol = 0.03
    assert error(state.params) < tol

    # 3. The tolerance is tight enough to catch the usual AdamW mistakes.
    mask = train._decay_mask(False)
    wrong = {
        "eps inside the sqrt": optax.adamw(LR, eps=0.0, eps_root=EPS, weight_decay=WD, mask=mask),
        "default eps 1e-8": optax.adamw(LR, eps=1e-8, weight_decay=WD, mask=mask),
        "no weight decay": optax.adamw(LR, eps=EPS, weight_decay=0.0),
        "decay on norms": optax.adamw(LR, eps=EPS, weight_decay=WD),
        "coupled L2": optax.chain(optax.add_decayed_weights(WD, mask), optax.adam(LR, eps=EPS)),
        "no bias correction": optax.chain(
            _no_bias_correction_adam(EPS), optax.add_decayed_weights(WD, mask), optax.scale(-LR)
        ),
    }
    for what, tx in wrong.items():
        p, opt_state, update = params, tx.init(params), jax.jit(tx.update)
        for b in batches:
            g, _ = grad_fn(p, b)
            u, opt_state = update(g, opt_state, p)
            p = optax.apply_updates(p, u)
        assert error(p) > 3 * tol, what


# --------------------------------------------------------------------------- devices

# One layer per stack keeps the compile time of the dropout (RNG) programs down.
DROPOUT_CFG = TINY.replace(num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.1)


@pytest.fixture(scope="module")
def eight_device_step():
    """A jitted HIR step with dropout and 2 microbatches on a (data=4, model=2) mesh."""
    p8 = part.make_partitioner(4, 2)
    opt = train.make_optimizer(learning_rate=1e-3)
    step = train.make_train_step(T5(DROPOUT_CFG), opt, p8, num_microbatches=2)
    return p8, opt, step


def test_eight_devices_match_one_device(eight_device_step):
    p8, opt, step8 = eight_device_step
    config = DROPOUT_CFG
    params = _init(config, 2)
    batches = [hir_batch(s, config.vocab_size) for s in (3, 4)]
    p1 = _one_device()
    step1 = train.make_train_step(T5(config), opt, p1, num_microbatches=2)
    runs = {}
    for name, p, step in (("8", p8, step8), ("1", p1, step1)):
        state = train.create_train_state(config, params, opt, p, jax.random.key(5))
        metrics = []
        for b in batches:
            state, m = step(state, b)
            metrics.append(jax.device_get(m))
        runs[name] = (jax.device_get(state), metrics)
    (s8, m8), (s1, m1) = runs["8"], runs["1"]
    # Same dropout masks, gradients and updates: the metrics of the second step already
    # reflect the first update.
    for a, b in zip(m8, m1, strict=True):
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert m8[1]["loss"] != m8[0]["loss"]
    assert int(s8.step) == int(s1.step) == 2
    assert _max_tree_rel(s8.params, s1.params) < 1e-6
    # Updates agree to rounding, except where a near-zero gradient makes Adam sign-like.
    delta8 = jax.tree.map(np.subtract, s8.params, jax.device_get(params))
    delta1 = jax.tree.map(np.subtract, s1.params, jax.device_get(params))
    close = jax.tree.map(lambda a, b: np.mean(np.abs(a - b) < 1e-6), delta8, delta1)
    assert min(jax.tree.leaves(close)) > 0.99
    assert _max_tree_rel(s8.opt_state, s1.opt_state) < 1e-4


def test_no_recompilation_for_new_data_of_the_same_shapes(eight_device_step):
    p8, opt, step = eight_device_step
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    state = train.create_train_state(DROPOUT_CFG, _init(DROPOUT_CFG, 3), opt, p8, jax.random.key(0))
    state, _ = step(state, hir_batch(10, DROPOUT_CFG.vocab_size))
    size = step.cache_size()
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for seed in (11, 12, 13):  # new data: host numpy, then already sharded, then numpy
            batch = hir_batch(seed, DROPOUT_CFG.vocab_size)
            if seed == 12:
                batch = p8.shard_batch(batch)
            if seed == 13:  # entries the step does not use change nothing
                batch["task_name"] = ["object_counting"] * 8
            state, m = step(state, batch)
        jax.block_until_ready(m)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == [] and step.cache_size() == size == 1
    assert int(state.step) == 4


def test_bf16_adafactor_fsdp_in_batch_step_runs():
    """bf16 activations with fp32 parameters; Adafactor state sharded under FSDP rules;
    the paper's in-batch contrastive term."""
    config = TINY.replace(dtype="bfloat16")
    p = part.make_partitioner(4, 2, fsdp=True)
    opt = train.make_optimizer("adafactor", learning_rate=1e-2)
    state = train.create_train_state(config, _init(config, 4), opt, p, jax.random.key(0))
    loss = train.LossConfig(contrastive="in_batch")
    step = train.make_train_step(T5(config), opt, p, loss=loss)
    batch = hir_batch(5, config.vocab_size)
    losses_seen, nll = [], []
    for _ in range(3):
        state, m = step(state, batch)
        losses_seen.append(float(m["loss"]))
        nll.append(float(m["nll"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    emb = state.params["token_embedder"]["embedding"]
    assert tuple(emb.sharding.spec) == ("model", "data")
    assert all(np.isfinite(losses_seen)) and float(m["contrastive"]) > 0
    assert losses_seen[-1] < losses_seen[0]  # it learns the repeated batch
    # Random init: the first NLL is near log(vocab).
    assert abs(nll[0] - np.log(config.vocab_size)) < 1.0


def test_eval_step_and_scores_match_the_model():
    params = _init(TINY, 6)
    p = _one_device()
    batch = hir_batch(6, TINY.vocab_size)
    model = T5(TINY)
    ll, n = train.make_score_fn(model, p)(params, batch)
    logits = jax.jit(model.apply)(
        {"params": params}, batch["encoder_pos_tokens"], batch["decoder_input_tokens"]
    )
    w = batch["decoder_loss_weights"]
    ref = np.asarray(losses.sequence_log_likelihood(logits, batch["decoder_target_tokens"], w))
    np.testing.assert_allclose(ll, ref, rtol=1e-5)
    np.testing.assert_array_equal(n, w.sum(-1))
    ev = train.make_eval_step(model, p)
    halves = [{k: v[i::2] for k, v in batch.items()} for i in range(2)]
    summary = train.summarize_eval([ev(params, h) for h in halves])
    ok = n > 0
    np.testing.assert_allclose(summary["perplexity"], np.exp(np.mean(-ref[ok] / n[ok])), rtol=1e-5)
    np.testing.assert_allclose(summary["token_perplexity"], np.exp(-ref.sum() / n.sum()), rtol=1e-5)
    assert set(summary) >= {"nll", "contrastive", "entropy", "token_accuracy"}


def test_optimizer_factory_options():
    opt = train.make_optimizer()
    assert float(opt.learning_rate(0)) == pytest.approx(5e-4)
    assert float(opt.learning_rate(10_000)) == pytest.approx(5e-4)
    warm = train.make_optimizer(schedule="linear", warmup_steps=10, total_steps=110)
    assert float(warm.learning_rate(5)) == pytest.approx(2.5e-4)
    assert float(warm.learning_rate(60)) == pytest.approx(2.5e-4)
    with pytest.raises(ValueError, match="make_optimizer.name = 'sgd': must be one of 'adamw'"):
        train.make_optimizer("sgd")
    with pytest.raises(ValueError, match="needs total_steps"):
        train.make_optimizer(schedule="cosine")
    clipped = train.make_optimizer(max_grad_norm=1.0)
    g = {"w": jnp.full((4,), 10.0)}
    u, _ = clipped.tx.update(g, clipped.tx.init(g), g)
    np.testing.assert_allclose(u["w"], -5e-4, rtol=1e-4)


def test_missing_batch_keys_and_bad_microbatches_are_clear_errors():
    batch = hir_batch(0, TINY.vocab_size)
    model = T5(TINY)
    p8 = part.make_partitioner(4, 2)
    opt = train.make_optimizer()
    abstract = train.abstract_train_state(TINY, opt, p8)
    no_neg = {k: v for k, v in batch.items() if k != "encoder_neg_tokens"}
    with pytest.raises(KeyError, match="encoder_neg_tokens"):
        train.make_train_step(model, opt, p8).lower(abstract, no_neg)
    # Plain NLL needs only the positive encoder input.
    train.make_train_step(model, opt, p8, loss=train.nll_loss_config()).lower(abstract, no_neg)
    step = train.make_train_step(model, opt, p8, loss=train.nll_loss_config(), num_microbatches=4)
    with pytest.raises(part.PartitioningError, match="microbatch size 2"):
        step.lower(abstract, batch)


def test_dropout_masks_differ_by_key_and_by_pass_and_never_touch_generation():
    from hir_jax import decoding

    off_cfg = DROPOUT_CFG.replace(dropout_rate=0.0)
    params = _init(DROPOUT_CFG, 0)
    batch = hir_batch(1, DROPOUT_CFG.vocab_size)
    same_input = {**batch, train.NEG: batch[train.POS]}  # negative rows = positive rows

    def run(cfg, loss, b, seed):  # the step's loss (forward only: quick to compile)
        def value(p, bb, key):
            norms = losses.normalisers(bb[train.WEIGHTS])
            return train._loss(T5(cfg), loss, p, bb, key, norms)[0]

        return float(jax.jit(value)(params, b, jax.random.key(seed)))

    def stats(cfg, seed):
        fn = jax.jit(
            lambda p, bb, key: train._token_stats(T5(cfg), train.LossConfig(), p, bb, key, True)
        )
        return jax.device_get(fn(params, same_input, jax.random.key(seed)))

    for passes in (2, 3):
        loss = train.LossConfig(forward_passes=passes)
        assert run(DROPOUT_CFG, loss, batch, 1) != run(DROPOUT_CFG, loss, batch, 2)
        assert run(off_cfg, loss, batch, 1) == run(off_cfg, loss, batch, 2)
    # The released three passes draw other masks than the two-pass form; without dropout
    # both are the same loss.
    two, three = train.LossConfig(forward_passes=2), train.LossConfig(forward_passes=3)
    assert run(DROPOUT_CFG, two, batch, 1) != run(DROPOUT_CFG, three, batch, 1)
    np.testing.assert_allclose(
        run(off_cfg, two, batch, 1), run(off_cfg, three, batch, 1), rtol=1e-6
    )
    # Positive and negative rows of one pass get their own masks: identical inputs, other
    # log-likelihoods (equal without dropout).
    on, off = stats(DROPOUT_CFG, 3), stats(off_cfg, 3)
    real = np.asarray(batch[train.WEIGHTS]).sum(-1) > 0
    assert np.all(on["pos_ll"][real] != on["neg_ll"][real])
    np.testing.assert_allclose(off["pos_ll"], off["neg_ll"], rtol=1e-6)
    # Sampling and evaluation never enable dropout: the same outputs as without it.
    cfg = decoding.SamplingConfig(num_samples=2, max_new_tokens=4)
    outs = [
        decoding.generate(T5(c), params, batch[train.POS], jax.random.key(4), cfg).tokens
        for c in (DROPOUT_CFG, off_cfg)
    ]
    np.testing.assert_array_equal(outs[0], outs[1])


def test_bf16_adamw_matches_torch_and_not_the_fp32_master_result():
    """The released numerics: bf16 weights and bf16 Adam moments, no fp32 master copy."""
    import torch

    config = get_config("tiny", param_dtype="bfloat16", dtype="bfloat16")
    opt = train.make_optimizer()  # AdamW 5e-4, weight decay 0
    state = train.create_train_state(config, _init(TINY), opt, _one_device(), jax.random.key(0))
    dtypes = {x.dtype for x in jax.tree.leaves((state.params, state.opt_state)) if x.ndim}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}

    rng = np.random.default_rng(0)
    # Weights of magnitude >= 0.25, where a 5e-4 step is below half a bf16 spacing.
    w = (rng.uniform(0.25, 1.0, (64, 48)) * rng.choice([-1, 1], (64, 48))).astype(np.float32)
    grads = [rng.normal(0, 1e-2, w.shape).astype(np.float32) for _ in range(12)]
    bf16 = jnp.bfloat16

    def ours(dtype):
        p = {"w": jnp.asarray(w, dtype)}
        s = opt.tx.init(p)
        for g in grads:
            u, s = opt.tx.update({"w": jnp.asarray(g, dtype)}, s, p)
            p = optax.apply_updates(p, u)
        return np.asarray(p["w"].astype(bf16).astype(jnp.float32))

    t = torch.tensor(w).to(torch.bfloat16)
    torch_opt = torch.optim.AdamW([t], lr=5e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    for g in grads:
        t.grad = torch.tensor(g).to(torch.bfloat16)
        torch_opt.step()
    reference = t.float().numpy()

    mine, master = ours(bf16), ours(jnp.float32)
    spacing = 2.0 ** (np.floor(np.log2(np.abs(reference))) - 7)  # one bf16 step
    assert np.max(np.abs(mine - reference) / spacing) <= 1  # equal to bf16 rounding
    assert np.mean(mine == reference) > 0.95
    # An fp32 master copy accumulates the small steps that bf16 rounds away.
    assert np.mean(master != reference) > 0.3
    assert np.mean(mine == w.astype(bf16).astype(np.float32)) > 0.9  # mostly stuck, as torch


def test_released_kl_term_matches_torch_kldivloss_and_vanishes_at_the_reference(tmp_path):
    """LossConfig.kl_coef: per example, torch's KLDivLoss(batchmean) at batch 1 of the
    policy's log-probs against the frozen reference's probs on the original-instruction
    input (the released ``--kl_loss``); 0 while the policy is the reference."""
    torch = pytest.importorskip("torch")
    from hf_reference import V1_1, make_hf_model, save_hf_model

    config, policy = load_hf(save_hf_model(make_hf_model(0, **V1_1), tmp_path / "p"))
    _, reference = load_hf(save_hf_model(make_hf_model(1, **V1_1), tmp_path / "r"))
    config = config.replace(dropout_rate=0.0)
    model = T5(config)
    batch = hir_batch(0, 160)
    orig = np.random.default_rng(5).integers(2, 160, batch["encoder_pos_tokens"].shape)
    orig[:, -3:] = 0
    batch["encoder_orig_tokens"] = orig.astype(np.int32)

    ours = np.asarray(jax.jit(train._reference_kl, static_argnums=0)(
        model, policy, reference, batch, None
    ))  # fmt: skip
    hf_p, hf_r = make_hf_model(0, **V1_1), make_hf_model(1, **V1_1)
    kl_div = torch.nn.KLDivLoss(reduction="batchmean")
    for i, w in enumerate(batch["decoder_loss_weights"]):
        n = int(w.sum())
        if n == 0:
            assert ours[i] == 0.0
            continue
        enc = torch.from_numpy(orig[i : i + 1].astype(np.int64))
        dec = torch.from_numpy(batch["decoder_input_tokens"][i : i + 1, :n].astype(np.int64))
        with torch.no_grad():
            logits = [
                m(input_ids=enc, attention_mask=(enc != 0).long(), decoder_input_ids=dec).logits
                for m in (hf_p, hf_r)
            ]
        expected = kl_div(torch.log_softmax(logits[0], -1), torch.softmax(logits[1], -1))
        np.testing.assert_allclose(ours[i], float(expected), rtol=2e-4)

    # In the loss: + kl_coef x the mean over examples; exactly 0 at the reference.
    with_kl = train.LossConfig(kl_coef=0.001)
    grads = jax.jit(
        lambda p, r, b, cfg: train.compute_gradients(model, p, b, None, loss=cfg, reference=r),
        static_argnums=3,
    )
    _, base = grads(policy, reference, batch, train.LossConfig())
    _, kl = grads(policy, reference, batch, with_kl)
    n_examples = float(np.sum(batch["decoder_loss_weights"].sum(1) > 0))
    np.testing.assert_allclose(
        float(kl["loss"]) - float(base["loss"]), 0.001 * ours.sum() / n_examples, rtol=1e-4
    )
    _, same = grads(policy, policy, batch, with_kl)
    assert float(same["kl_sum"]) == 0.0
    assert float(same["loss"]) == pytest.approx(float(base["loss"]), abs=1e-6)

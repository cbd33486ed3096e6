"""hir_jax.relabel: instructions, the swap, sub-output bounds, the gold rule, features."""

import jax
import numpy as np
import pytest

from hir_jax import features
from hir_jax import relabel as rl
from hir_jax.model.configs import EOS_ID, PAD_ID
from tasks.instructions import CORRECT, CORRECT_RELABEL_RELEASED, WRONG, prompt

QUERY = "Q: Which option?\nA:"


def tok(text):
    """Character-level toy tokenizer: ids 3.. (0 = PAD, 1 = EOS, 2 = UNK are special)."""
    return [ord(c) + 3 for c in text]


def detok(ids):
    return "".join(chr(i - 3) for i in ids if i > 2)


def out(text):
    """A sampled output as the sampler returns it: start id, tokens, EOS, padding."""
    return [PAD_ID] + tok(text) + [EOS_ID, PAD_ID, PAD_ID]


def relabel_with_span(text, correct, gold, span, **kw):
    """Relabel with the first seed whose sub-output is ``span`` (start, end)."""
    for seed in range(500):
        ex = rl.relabel(QUERY, out(text), correct, gold, seed, detokenize=detok, **kw)
        if (ex.start, ex.end) == span:
            return ex
    raise AssertionError(f"no seed gives span {span}")


def test_clean_output():
    np.testing.assert_array_equal(rl.clean_output([0, 5, 6, 1, 0, 0]), [5, 6, 1])
    np.testing.assert_array_equal(rl.clean_output([5, 6, 1, 7, 1]), [5, 6, 1])
    np.testing.assert_array_equal(rl.clean_output([0, 5, 6, 7]), [5, 6, 7, 1])  # no EOS: hit limit
    np.testing.assert_array_equal(rl.clean_output([0, 1]), [1])


def test_instruction_strings_and_swap_for_wrong_outputs():
    assert rl.instructions(True) == (CORRECT_RELABEL_RELEASED, WRONG)
    assert rl.instructions(True, relabel_instruction="paper") == (CORRECT, WRONG)
    assert rl.instructions(False) == (WRONG, CORRECT)
    assert rl.instructions(False, relabel_instruction="paper") == (WRONG, CORRECT)
    with pytest.raises(ValueError):
        rl.instructions(True, relabel_instruction="nope")
    for correct, mode, want in [
        (True, "released", (CORRECT_RELABEL_RELEASED, WRONG)),
        (True, "paper", (CORRECT, WRONG)),
        (False, "released", (WRONG, CORRECT)),
    ]:
        ex = rl.relabel(
            QUERY, out("(B) blue"), correct, "(A)", 0, sub_output=False, relabel_instruction=mode
        )
        assert (ex.positive, ex.negative) == want and ex.correct == correct
        assert ex.prefix.size == 0 and (ex.start, ex.end) == (0, 9)
        np.testing.assert_array_equal(ex.target, tok("(B) blue") + [EOS_ID])


def test_sub_output_bounds_over_many_seeds():
    gen = np.random.default_rng(0)
    for length in range(1, 14):
        seen = {rl.sample_span(length, gen) for _ in range(3000)}
        if length <= 3:
            assert seen == {(0, length)}
            continue
        starts = {s for s, _ in seen}
        assert starts == set(range(0, length - 3, 2)), length
        for s in starts:
            assert {e for s2, e in seen if s2 == s} == set(range(s + 1, length + 1, 2)), (length, s)
    # Roughly uniform over starts (released: np.random.choice over the range).
    counts = np.bincount([rl.sample_span(12, gen)[0] for _ in range(6000)], minlength=9)[::2]
    assert counts.min() > 0.8 * 6000 / 5 and counts.max() < 1.2 * 6000 / 5


def test_prefix_moved_to_encoder_and_target():
    # Wrong output, span (2, 5): prefix "xy", target "zwv" + EOS (prefix not in gold).
    ex = relabel_with_span("xyzwvu", False, "(A)", (2, 5))
    np.testing.assert_array_equal(ex.prefix, tok("xy"))
    np.testing.assert_array_equal(ex.target, tok("zwv") + [EOS_ID])
    assert (ex.positive, ex.negative, ex.correct) == (WRONG, CORRECT, False)
    # Span to the end: the output's own EOS is not doubled.
    ex = relabel_with_span("xyzwvu", False, "(A)", (2, 7))
    np.testing.assert_array_equal(ex.target, tok("zwvu") + [EOS_ID])
    feats = features.make_features([ex], tok, max_encoder_len=64, max_decoder_len=8)
    for key, instr in (("encoder_pos_tokens", WRONG), ("encoder_neg_tokens", CORRECT)):
        want = tok(prompt(instr, QUERY)) + tok("xy") + [EOS_ID]
        np.testing.assert_array_equal(feats[key][0, : len(want)], want)
        assert np.all(feats[key][0, len(want) :] == 0)


def test_gold_rule_substring_and_equal():
    # Wrong "(B)" vs gold "(A)": L = 4, start 0, end in {1, 3}.
    ex = relabel_with_span("(B)", False, "(A)", (0, 1))  # "(" is a substring of "(a)"
    assert (ex.positive, ex.negative, ex.correct, ex.sampled_correct) == (
        CORRECT,
        WRONG,
        True,
        False,
    )
    np.testing.assert_array_equal(ex.target, tok("("))  # unfinished answer: no EOS (released)
    ex = relabel_with_span("(B)", False, "(A)", (0, 1), eos_on_partial_answer=True)
    np.testing.assert_array_equal(ex.target, tok("(") + [EOS_ID])
    ex = relabel_with_span("(B)", False, "(A)", (0, 3))  # "(B)" is not
    assert (ex.positive, ex.correct) == (WRONG, False)
    np.testing.assert_array_equal(ex.target, tok("(B)") + [EOS_ID])
    # Head equal to the gold (after normalisation): correct, with EOS.
    ex = relabel_with_span("(a) (B)", False, "(A).", (2, 3))
    assert (ex.positive, ex.negative, ex.correct) == (CORRECT, WRONG, True)
    np.testing.assert_array_equal(ex.prefix, tok("(a"))
    np.testing.assert_array_equal(ex.target, tok(")") + [EOS_ID])
    # A correct output keeps the released positive instruction; partial -> no EOS.
    ex = relabel_with_span("(A)", True, "(A)", (0, 1))
    assert (ex.positive, ex.negative, ex.correct) == (CORRECT_RELABEL_RELEASED, WRONG, True)
    np.testing.assert_array_equal(ex.target, tok("("))
    # The released check is Python `in`: a head that normalises to "" counts as correct.
    ex = relabel_with_span(" .x", False, "(A)", (0, 1))
    assert ex.correct and ex.positive == CORRECT
    # The gold rule applies only to cut spans: whole outputs keep their feedback.
    ex = relabel_with_span("(B)", False, "(A)", (0, 3))
    assert not ex.correct
    ex = rl.relabel(QUERY, out("(B)"), False, "(A)", 0, sub_output=False)
    assert not ex.correct


def test_requires_detokenize_when_sub_output_on():
    with pytest.raises(ValueError, match="detokenize"):
        rl.relabel(QUERY, out("(B)"), False, "(A)", 0)


def test_deterministic_per_seed_and_key():
    texts = ["abcdefghij", "(A) because", "xyz", "0123456789abcdef"] * 5
    args = (
        [QUERY] * len(texts),
        [out(t) for t in texts],
        [i % 2 == 0 for i in range(len(texts))],
        ["(A)"] * len(texts),
    )

    def spans(seed):
        return [(e.start, e.end) for e in rl.relabel_batch(*args, seed, detokenize=detok)]

    assert spans(7) == spans(7)
    assert spans(7) != spans(8)
    assert spans(np.random.default_rng(7)) == spans(7)
    assert spans(jax.random.PRNGKey(3)) == spans(jax.random.PRNGKey(3))
    assert spans(jax.random.key(3)) == spans(jax.random.PRNGKey(3))
    assert spans(jax.random.PRNGKey(3)) != spans(jax.random.PRNGKey(4))
    with pytest.raises(ValueError, match="lengths differ"):
        rl.relabel_batch([QUERY], [], [True], ["x"], 0, detokenize=detok)


def test_feature_arrays():
    exs = [
        rl.relabel(QUERY, out("(A)"), True, "(A)", 0, sub_output=False),
        relabel_with_span("xyzwvu", False, "(A)", (2, 5)),
    ]

    def tok_with_eos(text):  # HF-style tokenizer that appends EOS: handled
        return tok(text) + [EOS_ID]

    f = features.make_features(exs, tok_with_eos, max_encoder_len=64, max_decoder_len=6)
    assert f["encoder_pos_tokens"].shape == f["encoder_neg_tokens"].shape == (2, 64)
    for k in ("decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights"):
        assert f[k].shape == (2, 6)
    assert f["encoder_pos_tokens"].dtype == np.int32
    assert f["decoder_loss_weights"].dtype == np.float32
    want = tok(prompt(CORRECT_RELABEL_RELEASED, QUERY)) + [EOS_ID]
    np.testing.assert_array_equal(f["encoder_pos_tokens"][0, : len(want)], want)
    want = tok(prompt(WRONG, QUERY)) + [EOS_ID]
    np.testing.assert_array_equal(f["encoder_neg_tokens"][0, : len(want)], want)
    np.testing.assert_array_equal(f["decoder_target_tokens"][0], tok("(A)") + [EOS_ID, 0, 0])
    np.testing.assert_array_equal(f["decoder_input_tokens"][0], [0] + tok("(A)") + [EOS_ID, 0])
    np.testing.assert_array_equal(f["decoder_loss_weights"][0], [1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(f["decoder_target_tokens"][1], tok("zwv") + [EOS_ID, 0, 0])
    np.testing.assert_array_equal(f["decoder_input_tokens"][1], [0] + tok("zwv") + [EOS_ID, 0])
    np.testing.assert_array_equal(f["positive_is_correct"], [1, 0])
    np.testing.assert_array_equal(f["encoder_truncated"], [0, 0])
    np.testing.assert_array_equal(f["decoder_truncated"], [0, 0])


def test_overflow_raises_or_truncates_with_counts():
    ex = relabel_with_span("abcdefghijklmnop", False, "(A)", (10, 15))
    prompt_len = max(len(tok(prompt(WRONG, QUERY))), len(tok(prompt(CORRECT, QUERY))))
    need = prompt_len + 10 + 1
    with pytest.raises(ValueError, match=f"needs {need} tokens"):
        features.make_features([ex], tok, max_encoder_len=need - 1, max_decoder_len=8)
    with pytest.raises(ValueError, match="decoder target has 6 tokens"):
        features.make_features([ex], tok, max_encoder_len=need, max_decoder_len=5)
    f = features.make_features(
        [ex], tok, max_encoder_len=need - 3, max_decoder_len=4, on_overflow="truncate"
    )
    assert f["encoder_truncated"][0] == 3 and f["decoder_truncated"][0] == 2
    # The oldest prefix tokens go, the same number under both instructions.
    for key, instr in (("encoder_pos_tokens", WRONG), ("encoder_neg_tokens", CORRECT)):
        want = tok(prompt(instr, QUERY)) + tok("defghij") + [EOS_ID]
        np.testing.assert_array_equal(f[key][0, : len(want)], want)
    np.testing.assert_array_equal(f["decoder_target_tokens"][0], tok("klmn"))
    np.testing.assert_array_equal(f["decoder_loss_weights"][0], [1, 1, 1, 1])
    with pytest.raises(ValueError, match="raise max_encoder_len"):  # prompt alone too long
        features.make_features(
            [ex], tok, max_encoder_len=10, max_decoder_len=8, on_overflow="truncate"
        )


def test_text_round_trips_of_the_released_trainer():
    """``retokenize``: the output text is tokenized again, and so is the cut span; a span
    that starts mid-word gains a word-start piece (SentencePiece)."""
    from tasks import vocab as vocab_lib

    vocab = vocab_lib.get_vocabulary(vocab_size=1024)

    def tokenize(text):
        return [int(t) for t in vocab.encode(text)]

    def detokenize(ids):
        return vocab.decode([int(t) for t in ids if int(t) > EOS_ID])

    ids = tokenize("(B) orange ball")
    pieces = [vocab.tokenizer.id_to_piece(i) for i in ids]
    # Spans start at even positions: the first even piece that continues a word ("B").
    starts = [i for i, p in enumerate(pieces) if i % 2 == 0 and not p.startswith("\u2581")]
    assert starts, pieces
    cut = starts[0]
    length = len(ids) + 1  # EOS
    for seed in range(200):  # a seed whose span starts at that mid-word piece
        span = rl.sample_span(length, np.random.default_rng(seed))
        if span[0] == cut:
            break
    else:
        raise AssertionError(f"no seed gives a span starting at {cut} of {length}")
    kw = dict(detokenize=detokenize, relabel_instruction="paper")
    plain = rl.relabel(QUERY, ids, False, "(A)", np.random.default_rng(seed), **kw)
    text = rl.relabel(
        QUERY, ids, False, "(A)", np.random.default_rng(seed), retokenize=tokenize, **kw
    )
    assert (plain.start, plain.end) == (text.start, text.end) == span
    body = ids[span[0] : span[1]]
    assert list(plain.target) == [t for t in body if t != EOS_ID] + [EOS_ID]
    again = [t for t in tokenize(detokenize(body)) if t != EOS_ID]
    assert list(text.target) == again + [EOS_ID] and again != body[: len(again)]
    assert vocab.tokenizer.id_to_piece(int(text.target[0])).startswith("\u2581")

"""Each method alone, without the loop: what it collects, the examples it builds from fixed
samples and verdicts, the loss it names; and the loop state's serialisation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from hir_jax import features, feedback, loop, runner
from hir_jax.checkpoints.state import StateCheckpointer
from hir_jax.data import Example
from hir_jax.loop_state import LoopState, ReplayBuffer
from hir_jax.methods import FARL, HIR, SFT, Method, Sample, ZeroShot
from hir_jax.methods.base import ExampleContext
from hir_jax.model.configs import EOS_ID, get_config
from hir_jax.model.t5 import init_params
from hir_jax.partitioning import make_partitioner
from hir_jax.train import LossConfig
from tasks.instructions import CORRECT, CORRECT_RELABEL_RELEASED, WRONG

QUESTIONS = [
    Example("t", 0, "Q: a?\nA:", "(A)", 3),
    Example("t", 1, "Q: b?\nA:", "(B)", 3),
]
# Fixed samples and verdicts: query 0 answered right, query 1 answered wrong.
SAMPLES = [Sample(0, (11, 12, 13, 14, 15), True), Sample(1, (21, 22, 23, 24, 25), False)]
BOUND = LossConfig(label_smoothing=0.1, normalisation="token", logits_chunk=8)


def _detok(ids):
    return " ".join(str(i) for i in ids)


def _tok(text):
    return [int(t) for t in text.split()]


def _examples(method: Method, items=SAMPLES, seed=0):
    rng = np.random.default_rng(seed)
    return [method.example(s, ExampleContext(QUESTIONS[s.query], rng, _detok, _tok)) for s in items]


def test_hir_relabels_in_hindsight_and_keeps_the_bound_loss():
    method = HIR(sub_output=False)
    assert method.collect(SAMPLES) == SAMPLES  # every sample joins the buffer
    right, wrong = _examples(method)
    assert (right.positive, right.negative) == (CORRECT_RELABEL_RELEASED, WRONG)
    assert (wrong.positive, wrong.negative) == (WRONG, CORRECT)
    assert list(wrong.target) == [21, 22, 23, 24, 25, EOS_ID] and len(wrong.prefix) == 0
    paper = _examples(dataclasses.replace(method, relabel_instruction="paper"))
    assert paper[0].positive == CORRECT
    blind = _examples(dataclasses.replace(method, hindsight=False))  # the ablation
    assert [ex.positive for ex in blind] == [CORRECT_RELABEL_RELEASED] * 2
    # Sub-output sampling draws a span from the example's generator: seeds fix it.
    cut = _examples(HIR(), seed=3)
    assert [ex.start for ex in cut] == [ex.start for ex in _examples(HIR(), seed=3)]
    assert any(len(ex.prefix) or len(ex.target) < 6 for ex in cut + _examples(HIR(), seed=4))
    loss = method.loss(dataclasses.replace(BOUND, kind="nll"))
    assert loss == dataclasses.replace(BOUND, kind="hir")
    assert features.required(loss) == [
        "encoder_pos_tokens",
        "decoder_input_tokens",
        "decoder_target_tokens",
        "decoder_loss_weights",
        "encoder_neg_tokens",
    ]
    assert method.holdout_fraction == 0.1
    with pytest.raises(ValueError, match="relabel_instruction"):
        HIR(relabel_instruction="nope")


def test_farl_keeps_correct_samples_as_plain_nll_examples():
    method = FARL()
    assert method.collect(SAMPLES) == [SAMPLES[0]]
    (ex,) = _examples(method, [SAMPLES[0]])
    assert ex.positive == CORRECT and list(ex.target) == [11, 12, 13, 14, 15, EOS_ID]
    assert len(ex.prefix) == 0
    loss = method.loss(BOUND)
    # The bound settings survive (today's memory lever logits_chunk among them).
    assert loss == dataclasses.replace(BOUND, kind="nll")
    assert "encoder_neg_tokens" not in features.required(loss)
    assert method.holdout_fraction == 0.0


def test_sft_trains_on_gold_answers_and_ignores_the_buffer():
    method = SFT()
    assert not method.samples and method.trains

    def tokenize(text):
        return [100 + ord(c) for c in text]

    items = method.training_items(SAMPLES, QUESTIONS, tokenize)
    assert items == [
        Sample(0, tuple(tokenize("(A)")), True),
        Sample(1, tuple(tokenize("(B)")), True),
    ]
    examples = _examples(method, items)
    assert [list(ex.target) for ex in examples] == [
        tokenize("(A)") + [EOS_ID],
        tokenize("(B)") + [EOS_ID],
    ]
    assert {ex.positive for ex in examples} == {CORRECT}
    assert method.loss(BOUND).kind == "nll" and method.loss(BOUND).logits_chunk == 8


def test_zero_shot_keeps_no_optimizer_state(tmp_path):
    config = get_config("tiny", vocab_size=256)
    part = make_partitioner(data=1, devices=jax.devices()[:1])
    spec = runner.setup(method=ZeroShot(), model_config=config, partitioner=part)
    assert spec.optimizer is None
    state = spec.initial_state(seed=0)
    assert jax.tree.leaves(state.opt_state) == []
    assert jax.tree.leaves(spec.abstract_state().opt_state) == []
    trained = runner.setup(method=HIR(), model_config=config, partitioner=part).initial_state(0)
    assert len(jax.tree.leaves(trained.opt_state)) > 0
    # Such a state checkpoints and restores like any other.
    with StateCheckpointer(str(tmp_path)) as ckpt:
        ckpt.save(0, state, {"round": 0})
        back = ckpt.restore_state(0, spec.abstract_state())
    want = init_params(config, jax.random.key(0))
    np.testing.assert_array_equal(
        np.asarray(back.params["decoder"]["logits_dense"]["kernel"]),
        np.asarray(want["decoder"]["logits_dense"]["kernel"]),
    )
    with pytest.raises(ValueError, match="trains nothing"):
        runner.setup(
            method=ZeroShot(),
            model_config=config,
            loop=loop.LoopConfig(warmup_task="x", warmup_epochs=1),
        )


def test_replay_buffer_dedup_rules_and_loop_state_round_trips():
    one_call = [Sample(0, (5, 6), True), Sample(1, (5, 6), False), Sample(0, (5, 6), True)]
    released = ReplayBuffer()
    assert released.extend(one_call) == 2  # a repeat within one question's call is dropped
    assert released.extend(one_call) == 2  # the next round's repeats are kept, as released
    whole_run = ReplayBuffer()
    assert whole_run.extend(one_call, "run") == 2
    assert whole_run.extend([*one_call, Sample(0, (7,), False)], "run") == 1
    assert [len(released), len(whole_run)] == [4, 3]
    with pytest.raises(ValueError, match="dedup"):
        released.extend(one_call, "never")
    buf = whole_run
    state = LoopState(round=2, step_in_round=5, buffer=buf, sample_metrics={"new_samples": 3.0})
    state.train_sums = {"loss": 1.5, "steps": 5.0}
    again = LoopState.from_json(json.loads(json.dumps(state.to_json())))
    assert again == state
    assert again.buffer.extend([Sample(1, (5, 6), False)], "run") == 0
    again.next_round()
    assert (again.round, again.step_in_round, again.sample_metrics, again.train_sums) == (
        3,
        0,
        None,
        {},
    )
    assert len(again.buffer) == 3  # the buffer carries over


def test_a_custom_judge_decides_the_verdicts():
    outputs, answers = ["(a).", "(B) orange", "(C)"], ["(A)", "(B)", "(A)"]
    correct, summary = feedback.score(outputs, answers, [3, 3, 3])
    assert correct == [True, False, False] and summary["format_error_rate"] == pytest.approx(1 / 3)

    def first_token(output, target):
        return output.split()[0].strip(".").lower() == target.lower()

    correct, summary = feedback.score(outputs, answers, [3, 3, 3], judge=first_token)
    assert correct == [True, True, False] and summary["accuracy"] == pytest.approx(2 / 3)
    per = feedback.per_task(["x", "x", "y"], [True, False, True])
    assert per == {"x/accuracy": 0.5, "y/accuracy": 1.0, "accuracy": 0.75}


def test_the_loop_driver_names_no_method():
    source = (Path(loop.__file__)).read_text()
    for name in ("hir", "farl", "sft", "zero_shot", "HIR", "FARL", "SFT", "ZeroShot"):
        assert f'"{name}"' not in source and f".{name}(" not in source, name
        assert f"import {name}" not in source, name

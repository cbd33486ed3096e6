"""Hindsight instruction relabeling and sub-output sampling (pure, host-side NumPy).

From a query, one sampled output (token ids), its correctness and the gold answer,
``relabel`` builds one training example: the positive and negative instruction, the
output tokens moved to the encoder (the "prefix") and the decoder target;
``features.make_features`` turns examples into the train step's padded arrays.

Rules (HIR_REFERENCE.md; released code ``offline_trainer.py``, the training loop):

* Output tokens: cut at the first EOS, PAD ids dropped (decoder start, padding), one EOS
  appended, as the released code does by decoding the sample with
  ``skip_special_tokens=True`` and re-tokenizing it (so an output that hit the length
  limit without EOS still ends in EOS). We stay in token space: no text round trip.
* Instructions: correct -> positive ``CORRECT_RELABEL_RELEASED`` (``relabel_instruction=
  "released"``, default) or ``CORRECT`` (``"paper"``), negative ``WRONG``;
  wrong -> positive ``WRONG``, negative ``CORRECT``.
* Sub-output sampling (``sub_output=True``, default): for an output of L tokens (EOS
  included), L <= 3 -> the whole; else start ~ U(range(0, L-3, 2)), end ~
  U(range(start+1, L+1, 2)). ``tokens[:start]`` goes to the encoder (before its final EOS,
  for both instructions); the target is ``tokens[start:end]`` (EOS removed) + EOS.
* Gold rule (only when the span is cut short, end < L): the text of ``tokens[:end]``
  (``detokenize``), normalised as the released code does (spaces and "." removed,
  lower-cased), is compared with the normalised gold answer. If equal, or a substring of
  it (Python ``in``: an empty string counts), the example is treated as correct; a wrong
  output then swaps its instructions, giving positive ``CORRECT`` (the released code's
  swap, in both modes) and negative ``WRONG``. In the substring-but-not-equal case the
  released code does not append EOS to the target (the answer is unfinished there);
  ``eos_on_partial_answer=True`` appends it as HIR_REFERENCE.md words it.

The released code draws a new span every time an example is visited (every epoch), so
keep raw samples in the replay buffer and call ``relabel_batch`` once per epoch with a
fresh seed. Randomness: a ``numpy.random.Generator``, an int seed, or a JAX PRNG key
(converted by ``as_generator``); spans are drawn in example order, so a seed fixes them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np

from hir_jax.special_ids import EOS_ID, PAD_ID
from tasks.instructions import CORRECT, CORRECT_RELABEL_RELEASED, WRONG
from tasks.metrics import normalize

RelabelInstruction = Literal["released", "paper"]
SeedLike = np.random.Generator | int | Any  # Any: a JAX PRNG key (raw uint32 or typed)


@dataclasses.dataclass(frozen=True)
class RelabeledExample:
    """One training example. ``prefix`` and ``target`` are int32 token ids.

    ``correct`` is the class the instructions express (after the gold rule);
    ``sampled_correct`` is the feedback of the whole sampled output; ``start``/``end``
    are the sub-output bounds within the cleaned output (EOS included).
    """

    query: str
    positive: str
    negative: str
    prefix: np.ndarray
    target: np.ndarray
    correct: bool
    sampled_correct: bool
    start: int
    end: int


def as_generator(seed: SeedLike) -> np.random.Generator:
    """A numpy Generator from a Generator (returned as is), an int, or a JAX PRNG key.

    A key (raw ``uint32[2]`` or typed ``jax.random.key``) seeds ``default_rng`` with its
    key words, so the same key always gives the same draws. jax is imported only for
    typed keys.
    """
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, int | np.integer):
        return np.random.default_rng(int(seed))
    data = seed
    dtype = getattr(seed, "dtype", None)
    if dtype is not None and "key" in str(dtype):
        import jax

        data = jax.random.key_data(seed)
    words = np.asarray(data).astype(np.uint32).ravel()
    return np.random.default_rng([int(w) for w in words])


def clean_output(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    """Sampled ids -> output tokens: cut at the first EOS, drop PAD, append one EOS."""
    arr = np.asarray(tokens, dtype=np.int64).ravel()
    eos = np.flatnonzero(arr == EOS_ID)
    if eos.size:
        arr = arr[: eos[0]]
    arr = arr[arr != PAD_ID]
    return np.concatenate([arr, [EOS_ID]]).astype(np.int32)


def sample_span(length: int, rng: np.random.Generator) -> tuple[int, int]:
    """Released sub-output bounds for an output of ``length`` tokens (EOS included).

    length <= 3 -> (0, length); else start uniform over range(0, length-3, 2) and end
    uniform over range(start+1, length+1, 2).
    """
    if length <= 3:
        return 0, length
    starts = range(0, length - 3, 2)
    start = starts[int(rng.integers(len(starts)))]
    ends = range(start + 1, length + 1, 2)
    return start, ends[int(rng.integers(len(ends)))]


def instructions(
    correct: bool, *, relabel_instruction: RelabelInstruction = "released"
) -> tuple[str, str]:
    """(positive, negative) instruction for a whole output judged ``correct`` or not."""
    if relabel_instruction not in ("released", "paper"):
        raise ValueError(
            f"relabel_instruction must be 'released' or 'paper', got {relabel_instruction!r}"
        )
    if correct:
        return (CORRECT_RELABEL_RELEASED if relabel_instruction == "released" else CORRECT), WRONG
    return WRONG, CORRECT


def _norm_output(text: str) -> str:
    # The released code's normalisation of the (partial) output text.
    return text.replace(" ", "").replace(".", "").lower()


def relabel(
    query: str,
    output: Sequence[int] | np.ndarray,
    correct: bool,
    gold: str,
    rng: SeedLike,
    *,
    detokenize: Callable[[list[int]], str] | None = None,
    sub_output: bool = True,
    relabel_instruction: RelabelInstruction = "released",
    eos_on_partial_answer: bool = False,
    retokenize: Callable[[str], Sequence[int]] | None = None,
) -> RelabeledExample:
    """Relabel one sampled output (see the module doc for every rule).

    ``query`` is the prompt text after the instruction ("Q: ...\\nA:"); ``output`` the
    sampled ids (EOS/PAD handled by ``clean_output``); ``correct`` its feedback; ``gold``
    the gold answer text. ``detokenize`` (ids -> text, special ids skipped) is required
    when ``sub_output`` is on, for the gold rule.

    ``retokenize`` (text -> ids, no EOS) makes the released code's text round trips: the
    output is decoded and tokenized again (the trainer reads the sampler's text), and so
    is the cut span (a span that starts mid-word then gains a word-start piece). Without
    it everything stays in the sampled token ids.
    """
    if (sub_output or retokenize is not None) and detokenize is None:
        raise ValueError("sub_output or retokenize needs detokenize (ids -> text)")
    tokens = clean_output(output)
    if retokenize is not None:
        tokens = clean_output(retokenize(detokenize(tokens.tolist())))
    length = len(tokens)
    start, end = sample_span(length, as_generator(rng)) if sub_output else (0, length)

    effective, swapped, partial = bool(correct), False, False
    if end < length:
        head = _norm_output(detokenize(tokens[:end].tolist()))
        gold_n = normalize(gold)  # the task metric's normalisation
        if head in gold_n:
            partial = head != gold_n
            swapped = not effective
            effective = True
    if swapped:
        positive, negative = CORRECT, WRONG  # the released code swaps the wrong pair
    else:
        positive, negative = instructions(effective, relabel_instruction=relabel_instruction)

    body = tokens[start:end]
    body = body[body != EOS_ID]
    if retokenize is not None:
        body = np.asarray([t for t in retokenize(detokenize(body.tolist())) if t != EOS_ID])
    if not (partial and not eos_on_partial_answer):
        body = np.concatenate([body, [EOS_ID]])
    return RelabeledExample(
        query=query,
        positive=positive,
        negative=negative,
        prefix=tokens[:start].astype(np.int32),
        target=body.astype(np.int32),
        correct=effective,
        sampled_correct=bool(correct),
        start=int(start),
        end=int(end),
    )


def relabel_batch(
    queries: Sequence[str],
    outputs: Sequence[Sequence[int] | np.ndarray],
    correct: Sequence[bool],
    golds: Sequence[str],
    rng: SeedLike,
    **kwargs: Any,
) -> list[RelabeledExample]:
    """``relabel`` over parallel lists, drawing spans in order from one Generator.

    Keyword arguments are those of ``relabel``.
    """
    n = len(queries)
    if not (len(outputs) == len(correct) == len(golds) == n):
        raise ValueError(
            f"lengths differ: {n} queries, {len(outputs)} outputs, {len(correct)} correct, "
            f"{len(golds)} golds"
        )
    gen = as_generator(rng)
    return [
        relabel(q, o, c, g, gen, **kwargs)
        for q, o, c, g in zip(queries, outputs, correct, golds, strict=True)
    ]

"""HIR: every sample is relabeled in hindsight (the paper's algorithm; defaults: the
released code's settings)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar, Literal

import gin

from hir_jax import relabel, settings
from hir_jax.methods.base import ExampleContext, Method, Sample

if TYPE_CHECKING:
    from hir_jax.train import LossConfig


@gin.configurable(module="hir_jax.methods")
@dataclasses.dataclass(frozen=True)
class HIR(Method):
    """Hindsight instruction relabeling with sub-output sampling and the HIR loss.

    ``hindsight=False`` relabels every output "correct" (the no-hindsight ablation);
    ``sub_output=False`` trains on whole outputs; ``relabel_instruction`` is "released"
    ("Solve question with correct answer." for correct outputs) or "paper";
    ``holdout_fraction`` of each round's buffer is held out for perplexity (10%, as the
    released trainer's ``train_test_split``); ``span_tokens`` is "ids" (the sampled ids
    throughout) or "text" (the released trainer's text round trips of the output and of
    the cut span, ``relabel.relabel(retokenize=...)``).
    """

    name: ClassVar[str] = "hir"
    hindsight: bool = True
    sub_output: bool = True
    relabel_instruction: relabel.RelabelInstruction = "released"
    holdout_fraction: float = 0.1
    span_tokens: Literal["ids", "text"] = "ids"

    def __post_init__(self) -> None:
        settings.check(
            self.gin_name(), self,
            relabel_instruction=settings.one_of("released", "paper"),
            span_tokens=settings.one_of("ids", "text"), holdout_fraction=settings.FRACTION,
        )  # fmt: skip

    def loss(self, base: LossConfig) -> LossConfig:
        return dataclasses.replace(base, kind="hir")

    def example(self, item: Sample, context: ExampleContext) -> relabel.RelabeledExample:
        return relabel.relabel(
            context.question.query,
            list(item.output),
            item.correct if self.hindsight else True,
            context.question.answer,
            context.rng,
            detokenize=context.detokenize,
            sub_output=self.sub_output,
            relabel_instruction=self.relabel_instruction,
            retokenize=context.tokenize if self.span_tokens == "text" else None,
        )

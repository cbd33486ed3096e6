"""One run's set-up and its entry point: what ``run.py`` and ``python -m hir_jax.aot`` share.

``setup()`` (gin-configured by the run, model and experiment files) resolves the method,
the loop settings, the model config (a gin model file, or the config of an HF or T5X
``INITIAL_CHECKPOINT``, read without its weights), the vocabulary, the optimizer (none for
a method that does not train), the loss the method trains with and the mesh. ``Setup``
builds the method's jitted train step; the AOT check compiles exactly that step.

``run()`` first makes sure MODEL_DIR can be written and the settings are in range, then
reads the task (SeqIO, ``hir_jax.data``) before any model is built, restores in T5X's
order (the newest intact checkpoint in MODEL_DIR, damaged ones moved aside, then
INITIAL_CHECKPOINT, then a fresh initialisation from the seed; a resumed run reads only
INITIAL_CHECKPOINT's config) and hands the train state and loop state to ``loop.Loop``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import gin
import jax

from hir_jax import data as data_lib
from hir_jax import feedback, metrics_log
from hir_jax.checkpoints import load_checkpoint, load_config, load_vocabulary
from hir_jax.checkpoints.state import StateCheckpointer, check_same_shape
from hir_jax.loop import Loop, LoopConfig, Split
from hir_jax.loop_state import LoopState
from hir_jax.methods import HIR, Method
from hir_jax.model.configs import EOS_ID, T5Config
from hir_jax.model.t5 import T5, init_params
from hir_jax.partitioning import Partitioner, make_partitioner
from hir_jax.paths import as_path, check_writable_dir
from hir_jax.preemption import Preemption
from hir_jax.train import (
    LossConfig,
    Optimizer,
    StateExtras,
    abstract_train_state,
    create_train_state,
    make_optimizer,
    make_train_step,
)


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything of a run that is not data or state (see the module doc)."""

    method: Method
    loop: LoopConfig
    config: T5Config
    model_name: str
    initial_checkpoint: str | None
    vocabulary_fn: Callable[[], Any] | None
    optimizer: Optimizer | None  # None: the method trains nothing
    base_loss: LossConfig  # as gin bound it
    loss: LossConfig  # what the method trains with
    partitioner: Partitioner

    @property
    def warmup_loss(self) -> LossConfig:
        """The warm-up's: plain NLL, no label smoothing and no KL term, the bound loss's
        other settings."""
        return dataclasses.replace(self.base_loss, kind="nll", label_smoothing=0.0, kl_coef=0.0)

    @property
    def extras(self) -> StateExtras:
        """The train state's layout: the method's, with the frozen reference when the loss
        has the KL term."""
        extras = self.method.state_extras()
        return dataclasses.replace(extras, reference=True) if self.loss.kl_coef else extras

    def train_step(self, model: T5) -> Any:
        """The method's jitted train step."""
        return self.method.make_train_step(
            model, self.optimizer, self.partitioner, self.loss, self.loop.num_microbatches,
            self.extras,
        )  # fmt: skip

    def supervised_step(self, model: T5, loss: LossConfig) -> Any:
        """A supervised step of ``loss`` (the warm-up's) over this method's train state."""
        return make_train_step(
            model, self.optimizer, self.partitioner, loss=loss,
            num_microbatches=self.loop.num_microbatches, extras=self.extras,
        )  # fmt: skip

    def abstract_state(self) -> Any:
        """The train state as sharded ``ShapeDtypeStruct``s (restore target, AOT input)."""
        return abstract_train_state(self.config, self.optimizer, self.partitioner, self.extras)

    def vocabulary(self) -> Any:
        """INITIAL_CHECKPOINT's ``spiece.model``, else the bound vocabulary."""
        vocab = None
        if self.initial_checkpoint:
            try:
                vocab = load_vocabulary(self.initial_checkpoint)
            except FileNotFoundError:
                vocab = None
        if vocab is None:
            if self.vocabulary_fn is None:
                raise ValueError(
                    "no vocabulary: bind setup.vocabulary or use a checkpoint with spiece.model"
                )
            vocab = self.vocabulary_fn()
        if vocab.vocab_size > self.config.vocab_size:
            raise ValueError(
                f"vocabulary has {vocab.vocab_size} ids but the model only {self.config.vocab_size}"
            )
        return vocab

    def initial_state(self, seed: int) -> Any:
        """Step 0: INITIAL_CHECKPOINT's weights (each host reads its devices' slices), or a
        fresh initialisation from ``seed``."""
        if self.initial_checkpoint:
            _, params = load_checkpoint(self.initial_checkpoint, self.config, lazy=True)
        else:
            params = init_params(self.config, jax.random.key(seed))
        rng = jax.random.fold_in(jax.random.key(seed), 1)
        return create_train_state(
            self.config, params, self.optimizer, self.partitioner, rng, self.extras
        )


@gin.configurable(module="hir_jax.runner")
def setup(
    *,
    method: Method | None = None,
    model_config: T5Config | None = None,
    model_name: str = "custom",
    initial_checkpoint: str | None = None,
    vocabulary: Callable[[], Any] | None = None,
    loop: LoopConfig | None = None,
    optimizer: Optimizer | None = None,
    loss: LossConfig | None = None,
    partitioner: Partitioner | None = None,
) -> Setup:
    """The run's set-up from its gin bindings (or these arguments); reads no weights."""
    method = method if method is not None else HIR()
    if not isinstance(method, Method):
        raise TypeError(
            f"setup.method must be a hir_jax.methods.Method (e.g. @hir_jax.methods.HIR()), "
            f"got {method!r}"
        )
    loop = loop or LoopConfig()
    if model_config is None and initial_checkpoint is None:
        raise ValueError("set a model config (a gin_configs/models file) or INITIAL_CHECKPOINT")
    if loop.warms_up and not method.trains:
        raise ValueError(
            f"method {method.name!r} trains nothing, so it cannot warm up: unset "
            "LoopConfig.warmup_task"
        )
    partitioner = partitioner or make_partitioner()
    if method.trains:
        loop.check_mesh(partitioner.data_size)
    config = load_config(initial_checkpoint, model_config) if initial_checkpoint else model_config
    base_loss = loss or LossConfig()
    return Setup(
        method=method,
        loop=loop,
        config=config,
        model_name=model_name,
        initial_checkpoint=initial_checkpoint,
        vocabulary_fn=vocabulary,
        optimizer=(optimizer or make_optimizer()) if method.trains else None,
        base_loss=base_loss,
        loss=method.loss(base_loss),
        partitioner=partitioner,
    )


def _split(examples: Any, codec: data_lib.TextCodec, max_length: int, name: str) -> Split:
    return Split(examples, data_lib.prompt_ids(examples, codec.encode, EOS_ID, max_length, name))


def _check_same_run(saved: dict[str, Any], identity: dict[str, Any], model_dir: str) -> None:
    """Refuses a checkpoint of another model shape, task or method."""
    check_same_shape(saved["model_shape"], identity["model_shape"], f"MODEL_DIR {model_dir}")
    for key in ("task", "method"):
        if saved[key] != identity[key]:
            raise ValueError(
                f"MODEL_DIR {model_dir} holds a {key}={saved[key]!r} run, "
                f"not {identity[key]!r}; use a new MODEL_DIR"
            )


@gin.configurable(module="hir_jax.runner")
def run(
    model_dir: str = gin.REQUIRED,
    task: str = gin.REQUIRED,
    seed: int = 0,
    judge: feedback.Judge = feedback.exact_match,
    spec: Setup | None = None,
    variant: str | None = None,
) -> dict[str, Any]:
    """Runs (or resumes) one experiment into ``model_dir``; returns the final test metrics.

    ``task``: a SeqIO task or mixture name (``hir_jax.data``). ``judge``: is an output
    correct, ``(output_text, target_text) -> bool``. ``spec``: the set-up (default:
    ``setup()`` as gin binds it). ``variant``: a label for the report, which shows the run
    in its own column ("HIR (no_entropy)") instead of averaging it with the method's.
    """
    check_writable_dir(model_dir, "MODEL_DIR")  # first: before settings, task or model
    spec = spec if spec is not None else setup()
    cfg = spec.loop
    chief = jax.process_index() == 0
    if not chief:  # one host reports; the others keep quiet
        metrics_log.set_progress_enabled(False)
    vocab = spec.vocabulary()
    task_data = data_lib.load(
        task, vocab, train_split=cfg.train_split, test_split=cfg.test_split,
        max_train_examples=cfg.max_train_examples, max_test_examples=cfg.max_test_examples,
    )  # fmt: skip
    warmup = ()
    if cfg.warms_up:  # its training split only
        warmup = data_lib.load(
            cfg.warmup_task, vocab, train_split=cfg.train_split, test_split=None
        ).train
    codec = data_lib.TextCodec(vocab, EOS_ID + 1)
    train = _split(task_data.train, codec, cfg.max_input_length, "train")
    test = _split(task_data.test, codec, cfg.max_input_length, "test")
    identity = {
        "model_shape": spec.config.shape_dict(),
        "task": task_data.name,
        "method": spec.method.name,
        "seed": seed,
    }
    with (
        StateCheckpointer(model_dir, max_to_keep=cfg.keep_checkpoints) as checkpointer,
        metrics_log.MetricsWriter(model_dir, active=chief) as writer,
    ):
        if chief:
            (as_path(model_dir) / "config.gin").write_text(gin.config_str())
            metrics_log.write_run_info(
                model_dir, task=task_data.name, method=spec.method.name, seed=seed,
                model=spec.model_name, initial_checkpoint=spec.initial_checkpoint or "",
                tasks=list(task_data.tasks), loss=dataclasses.asdict(spec.loss),
                num_train=len(task_data.train),
                samples_per_round=len(task_data.train) * cfg.samples_per_query
                if spec.method.samples else 0,
                **({"variant": variant} if variant else {}),
            )  # fmt: skip
        restored = checkpointer.restore_newest(
            spec.abstract_state(), lambda saved: _check_same_run(saved, identity, model_dir)
        )
        if restored is None:
            state, progress = spec.initial_state(seed), LoopState()
            writer.reset()
        else:
            latest, saved, state = restored
            progress = LoopState.from_json(saved)
            # Lines of rounds not yet finished are written again when they finish.
            writer.truncate_after(progress.round - 1)
            metrics_log.console(
                f"resumed from {checkpointer.directory}/{latest}: round {progress.round}, "
                f"step {progress.step_in_round} of the round, buffer {len(progress.buffer)}"
            )
        loop = Loop(
            spec=spec, model=T5(spec.config), codec=codec, data=task_data, train=train,
            test=test, warmup=warmup, seed=seed, model_dir=model_dir, writer=writer,
            checkpointer=checkpointer, identity=identity, judge=judge,
        )  # fmt: skip
        with Preemption() as preemption:
            loop.run(state, progress, preemption)
        if chief:
            metrics_log.mark_done(model_dir)
        final = [r for r in writer.records if r["split"] == "test"]
    return final[-1] if final else {}

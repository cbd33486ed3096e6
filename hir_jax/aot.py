"""Ahead-of-time memory check: will this model, mesh and batch fit on the chips I rent?

Lowers and compiles the HIR train step and the sampler for *abstract* shapes
(``jax.ShapeDtypeStruct`` with shardings: no weights are read or allocated) on a device
mesh, and prints per device the parameter, optimizer-state and temporary memory of the
compiled executables, with a verdict against the memory of one chip::

    # flan_t5_large on a TPU v5e-8 slice (8 chips of 16 GiB), simulated on this CPU:
    python -m hir_jax.aot --gin_file=runs/hir.gin --gin_file=models/flan_t5_large.gin \
        --devices 8 --data 4 --model 2 --per_chip_memory v5e

    # the same with a named size and explicit shapes instead of gin files:
    python -m hir_jax.aot --size small --devices 8 --batch 64 --input_length 512 \
        --target_length 64 --per_chip_memory 16GiB

Model: ``--size`` (tiny, small, ..., xxl), or the gin files of ``run.py`` (same search
path, ``gin_configs/``), resolved by the run's own set-up (``runner.setup``: a model file,
or the config of an HF or T5X ``INITIAL_CHECKPOINT``, read without its weights). The
method, its loss, the optimizer (AdamW keeps two fp32 moments per parameter, Adafactor
factored ones), the mesh and the batch, number of microbatches, samples per query and
``max_new_tokens`` (``hir_jax.loop.LoopConfig``) come from the same set-up, and the train
step compiled is the one the run trains (``Setup.train_step``); flags override them.
Shapes: the train batch is ``[batch, input_length]`` (encoder, under both instructions,
when the loss needs both) and ``[batch, target_length]`` (decoder; default: the length bucket
of ``max_new_tokens + 1``, the longest the loop builds); the sampler draws
``num_samples`` outputs of ``max_new_tokens`` tokens for ``sample_batch`` prompts of
``sample_input_length`` tokens (default ``input_length``).

``--devices N`` simulates N devices on the host CPU (it sets ``XLA_FLAGS=
--xla_force_host_platform_device_count=N`` and ``JAX_PLATFORMS=cpu`` before JAX starts).
Without it the real devices are used: on a TPU VM or GPU host the numbers then come from
that backend's compiler. CPU numbers are an estimate of a TPU/GPU compile: parameter and
optimizer bytes are exact (they follow from the shardings), temporaries depend on the
compiler's fusion and scheduling. On a GPU, JAX preallocates 75% of the memory by
default (``XLA_PYTHON_CLIENT_MEM_FRACTION``): compare against that share.

Peak per device = arguments + outputs - donated (aliased) + temporaries + code. For the
sampler two peaks are given: alone, and with the train state resident, as in the HIR
loop, where the optimizer state stays on the device while sampling. The verdict uses
the larger of the train step's and the loop's sampling peak. Exit status: 0 fits,
1 does not fit, 2 bad input (e.g. a mesh axis that does not divide a dimension).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from hir_jax.gin_cli import add_gin_flags, one_line, parse_gin, parse_with_bindings

if TYPE_CHECKING:  # keep JAX unimported until --devices has set XLA_FLAGS
    from hir_jax.methods import Method
    from hir_jax.model.configs import T5Config
    from hir_jax.partitioning import Partitioner
    from hir_jax.train import LossConfig, Optimizer

GiB = 2**30
_OPT_NAME = "hir_jax.train.make_optimizer.name"
# Memory of one chip (per device as JAX sees it), for --per_chip_memory NAME.
CHIP_MEMORY: dict[str, int] = {
    "v4": 32 * GiB,
    "v5e": 16 * GiB,
    "v5p": 95 * GiB,
    "v6e": 32 * GiB,
    "h100": 80 * GiB,
}
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(i)?)?B?\s*$", re.IGNORECASE)


def parse_memory(value: int | str) -> int:
    """Bytes from an int, a size ("16GiB", "16 GiB", "80GB", "512MiB"; GB = 10**9 bytes,
    GiB = 2**30) or a chip name from ``CHIP_MEMORY`` ("v5e", "v4", "v5p", "v6e", "h100")."""
    if isinstance(value, int):
        return value
    text = value.strip()
    if text.lower() in CHIP_MEMORY:
        return CHIP_MEMORY[text.lower()]
    match = _SIZE_RE.match(text)
    if not match:
        names = ", ".join(CHIP_MEMORY)
        raise ValueError(f"cannot parse memory size {value!r} (e.g. 16GiB, 80GB, or {names})")
    number, prefix, binary = match.groups()
    prefix = (prefix or "").upper()
    scale = 1024 ** ("KMGT".index(prefix) + 1) if binary and prefix else _UNITS[prefix]
    return int(float(number) * scale)


def format_bytes(n: float) -> str:
    """Human-readable binary size: ``1.50 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- analysis


def shard_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded arrays or ``ShapeDtypeStruct``s
    (each leaf's shard shape; a leaf without a sharding counts whole)."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def state_memory(
    config: T5Config, optimizer: Optimizer, partitioner: Partitioner
) -> dict[str, int]:
    """Per-device bytes of the train state from its shardings alone (nothing compiled):
    ``parameter_bytes``, ``optimizer_bytes`` and ``state_bytes`` (all of it)."""
    from hir_jax.train import abstract_train_state

    return _state_bytes(abstract_train_state(config, optimizer, partitioner))


def _state_bytes(state: Any) -> dict[str, int]:
    return {
        "parameter_bytes": shard_bytes(state.params),
        "optimizer_bytes": shard_bytes(state.opt_state),
        "reference_bytes": shard_bytes(state.reference),  # an RL method's frozen policy
        "head_bytes": shard_bytes(state.heads),  # e.g. PPO's value head
        "state_bytes": shard_bytes(state),
    }


def _memory(compiled: Any) -> dict[str, int]:
    stats = compiled.memory_analysis()
    if stats is None:
        raise RuntimeError("this backend's compiler gives no memory analysis")
    out = {
        "argument_bytes": int(stats.argument_size_in_bytes),
        "output_bytes": int(stats.output_size_in_bytes),
        "alias_bytes": int(stats.alias_size_in_bytes),
        "temp_bytes": int(stats.temp_size_in_bytes),
        "code_bytes": int(getattr(stats, "generated_code_size_in_bytes", 0) or 0),
    }
    out["peak_bytes"] = (
        out["argument_bytes"]
        + out["output_bytes"]
        - out["alias_bytes"]
        + out["temp_bytes"]
        + out["code_bytes"]
    )
    return out


def _check_rows(what: str, rows: int, multiple: int, mesh: dict[str, int]) -> None:
    from hir_jax.partitioning import PartitioningError

    if rows % multiple:
        raise PartitioningError(
            f"{what} {rows} is not divisible by {multiple} (mesh {mesh}); "
            f"use a multiple of {multiple}"
        )


def analyze(
    config: T5Config,
    *,
    data: int | None = None,
    model: int | None = None,
    fsdp: bool | None = None,
    batch: int = 64,
    input_length: int = 512,
    target_length: int = 64,
    num_microbatches: int = 1,
    sample_batch: int | None = None,
    sample_input_length: int | None = None,
    num_samples: int = 1,
    max_new_tokens: int = 256,
    sampler: bool = True,
    per_chip_memory: int | str | None = None,
    optimizer: Optimizer | None = None,
    loss: LossConfig | None = None,
    method: Method | None = None,
    devices: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Compiles the train step (and the sampler) for abstract shapes; per-device bytes.

    ``data``/``model``/``fsdp``/``devices`` build the mesh as ``make_partitioner`` does
    (-1: the remaining devices; None: as gin binds it, else all devices on ``data``).
    ``method`` (default HIR), ``optimizer`` and ``loss`` (the bound ``LossConfig``, which
    the method turns into its own) default to their gin configuration; the train step is
    the one ``runner.Setup.train_step`` builds for a run, so the figure is that of the
    step the run trains. Returns a dict:
    ``mesh``, ``num_devices``, ``platform``, ``num_params``, ``train`` and (with
    ``sampler``) ``sampler`` (each: ``argument_bytes``, ``output_bytes``, ``alias_bytes``,
    ``temp_bytes``, ``code_bytes``, ``peak_bytes``, ``compile_seconds``; ``train`` adds
    ``parameter_bytes``, ``optimizer_bytes``, ``state_bytes``; ``sampler`` adds
    ``loop_peak_bytes``, its peak with the train state resident), ``peak_bytes`` (the
    larger of the two) and, when ``per_chip_memory`` is given, ``per_chip_memory`` and
    ``fits``. Raises ``PartitioningError`` when a dimension does not divide its mesh axis.
    """
    import jax

    from hir_jax import decoding, features, runner
    from hir_jax.loop import LoopConfig
    from hir_jax.model.t5 import T5, count_params, param_shapes
    from hir_jax.partitioning import make_partitioner

    mesh_args = dict(data=data, model=model, fsdp=fsdp, devices=devices)
    partitioner = make_partitioner(**{k: v for k, v in mesh_args.items() if v is not None})
    mesh = {k: int(v) for k, v in partitioner.mesh.shape.items()}
    optimizer_name = _gin_value(_OPT_NAME, "adamw")
    given = dict(method=method, optimizer=optimizer, loss=loss)  # None: as gin binds it
    spec = runner.setup(
        model_config=config, initial_checkpoint=None, partitioner=partitioner,
        loop=LoopConfig(batch_size=batch, num_microbatches=num_microbatches, warmup_task=None),
        **{k: v for k, v in given.items() if v is not None},
    )  # fmt: skip
    if spec.optimizer is None:
        raise ValueError(
            f"method {spec.method.name!r} trains nothing, so there is no train step to check"
        )
    loss = spec.loss
    t5 = T5(config)

    state = spec.abstract_state()
    _check_rows("batch", batch, mesh["data"] * num_microbatches, mesh)
    step = spec.train_step(t5)
    train_batch = features.abstract_batch(
        loss, batch, input_length, target_length, partitioner.batch_sharding, keys=step.keys
    )
    start = time.perf_counter()
    compiled = step.lower(state, train_batch).compile()
    train_stats = _memory(compiled)
    train_stats.update(
        compile_seconds=time.perf_counter() - start,
        batch_bytes=shard_bytes(train_batch),
        **_state_bytes(state),
    )
    result: dict[str, Any] = {
        "mesh": mesh,
        "fsdp": bool(fsdp),
        "num_devices": int(partitioner.mesh.devices.size),
        "platform": partitioner.mesh.devices.flat[0].platform,
        "num_params": count_params(param_shapes(config)),
        "optimizer": optimizer_name,
        "method": spec.method.name,
        "loss": spec.method.name
        if step.keys is not None
        else f"{loss.kind}" + (f"/{loss.contrastive}" if loss.kind == "hir" else ""),
        "shapes": {
            "batch": batch,
            "num_microbatches": num_microbatches,
            "input_length": input_length,
            "target_length": target_length,
        },
        "train": train_stats,
    }
    peak = train_stats["peak_bytes"]

    if sampler:
        rows_wanted = sample_batch or batch
        rows = features.padded_rows(rows_wanted, mesh["data"])  # as the loop pads them
        prompt_len = sample_input_length or input_length
        cfg = decoding.SamplingConfig(num_samples=num_samples, max_new_tokens=max_new_tokens)
        enc = jax.ShapeDtypeStruct((rows, prompt_len), "int32", sharding=partitioner.batch_sharding)
        row_ids = jax.ShapeDtypeStruct((rows,), "int32", sharding=partitioner.batch_sharding)
        key = jax.eval_shape(lambda: jax.random.key(0))
        key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=partitioner.replicated)
        start = time.perf_counter()
        lowered = decoding.generate_fn(t5, cfg, partitioner).lower(state.params, enc, key, row_ids)
        sample_stats = _memory(lowered.compile())
        sample_stats["compile_seconds"] = time.perf_counter() - start
        # In the loop the whole train state stays on the device while sampling.
        resident = train_stats["state_bytes"] - train_stats["parameter_bytes"]
        sample_stats["loop_peak_bytes"] = sample_stats["peak_bytes"] + resident
        result["sampler"] = sample_stats
        result["shapes"].update(
            sample_batch=rows,
            sample_input_length=prompt_len,
            num_samples=num_samples,
            max_new_tokens=max_new_tokens,
        )
        peak = max(peak, sample_stats["loop_peak_bytes"])
    result["peak_bytes"] = peak
    if per_chip_memory is not None:
        result["per_chip_memory"] = parse_memory(per_chip_memory)
        result["fits"] = fits(result, result["per_chip_memory"])
    return result


def fits(result: dict[str, Any], per_chip_memory: int | str) -> bool:
    """The verdict for an ``analyze`` result: its peak per device within the chip's memory."""
    return result["peak_bytes"] <= parse_memory(per_chip_memory)


def format_report(result: dict[str, Any], name: str = "model") -> str:
    """The per-device table printed by the command line."""
    fb = format_bytes
    s = result["shapes"]
    t = result["train"]
    mesh = result["mesh"]
    lines = [
        f"{name}: {result['num_params'] / 1e6:.1f}M parameters; mesh data={mesh['data']} x "
        f"model={mesh['model']} ({result['num_devices']} {result['platform']} devices)"
        + (", fsdp" if result["fsdp"] else ""),
        f"train step: batch {s['batch']} ({s['num_microbatches']} microbatch"
        f"{'es' if s['num_microbatches'] > 1 else ''}), encoder {s['input_length']}, "
        f"decoder {s['target_length']}, loss {result['loss']}, optimizer {result['optimizer']}"
        f"  [compiled in {t['compile_seconds']:.1f} s]",
        "  per device:",
        f"    parameters        {fb(t['parameter_bytes']):>12}",
        f"    optimizer state   {fb(t['optimizer_bytes']):>12}",
    ]
    if t.get("reference_bytes") or t.get("head_bytes"):
        lines += [
            f"    reference model   {fb(t['reference_bytes']):>12}",
            f"    value head        {fb(t['head_bytes']):>12}",
        ]
    lines += [
        f"    batch             {fb(t['batch_bytes']):>12}",
        f"    temporaries       {fb(t['temp_bytes']):>12}",
        f"    arguments         {fb(t['argument_bytes']):>12}  (donated/aliased "
        f"{fb(t['alias_bytes'])}, outputs {fb(t['output_bytes'])})",
        f"    peak              {fb(t['peak_bytes']):>12}",
    ]
    if "sampler" in result:
        g = result["sampler"]
        lines += [
            f"sampler: {s['sample_batch']} prompts x {s['num_samples']} sample"
            f"{'s' if s['num_samples'] > 1 else ''}, prompt {s['sample_input_length']}, "
            f"{s['max_new_tokens']} new tokens  [compiled in {g['compile_seconds']:.1f} s]",
            "  per device:",
            f"    arguments         {fb(g['argument_bytes']):>12}  (parameters + prompts)",
            f"    temporaries       {fb(g['temp_bytes']):>12}  (KV cache, encoder output, ...)",
            f"    outputs           {fb(g['output_bytes']):>12}",
            f"    peak alone        {fb(g['peak_bytes']):>12}",
            f"    peak in the loop  {fb(g['loop_peak_bytes']):>12}  (optimizer state resident)",
        ]
    if "per_chip_memory" in result:
        mem, peak = result["per_chip_memory"], result["peak_bytes"]
        verdict = "fits" if result["fits"] else "does not fit"
        lines.append(
            f"verdict: {verdict}: peak {fb(peak)} per device of {fb(mem)} per chip "
            f"({100 * peak / mem:.1f}%)"
        )
    if result["platform"] == "cpu":
        lines.append(
            "note: compiled by the XLA CPU backend; parameter and optimizer bytes are exact, "
            "temporaries are an estimate of a TPU/GPU compile"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Flags; ``--gin.NAME=VALUE`` arguments are collected in ``gin_bindings``."""
    ap = argparse.ArgumentParser(
        prog="python -m hir_jax.aot",
        description="Compile the train step and sampler for abstract shapes on a device mesh "
        "and report per-device memory against one chip's.",
        epilog="Chip names for --per_chip_memory: "
        + ", ".join(f"{k} ({v // GiB} GiB)" for k, v in CHIP_MEMORY.items())
        + ". Exit status: 0 fits, 1 does not fit, 2 bad input.",
    )
    add_gin_flags(ap)
    ap.add_argument("--size", help="model size instead of gin files: tiny, small, ..., xxl")
    ap.add_argument("--devices", type=int, help="simulate this many devices on the host CPU")
    ap.add_argument("--data", type=int, help="mesh data axis (-1: the rest; default: gin/-1)")
    ap.add_argument("--model", type=int, help="mesh model axis (default: gin/1)")
    ap.add_argument(
        "--fsdp", action=argparse.BooleanOptionalAction, help="shard parameters over data too"
    )
    ap.add_argument("--batch", type=int, help="train batch (default: LoopConfig.batch_size)")
    ap.add_argument("--num_microbatches", type=int, help="default: LoopConfig.num_microbatches")
    ap.add_argument("--input_length", type=int, default=512, help="encoder length (512)")
    ap.add_argument(
        "--target_length", type=int, help="decoder length (default: bucket of max_new_tokens+1)"
    )
    ap.add_argument("--sample_batch", type=int, help="default: LoopConfig.sample_batch_size")
    ap.add_argument("--sample_input_length", type=int, help="prompt length (default: input)")
    ap.add_argument("--num_samples", type=int, help="default: LoopConfig.samples_per_query")
    ap.add_argument("--max_new_tokens", type=int, help="default: LoopConfig.max_new_tokens")
    ap.add_argument("--no_sampler", action="store_true", help="only the train step")
    ap.add_argument(
        "--per_chip_memory", default="16GiB", help="e.g. 16GiB, 80GB or a chip name (16GiB)"
    )
    ap.add_argument("--json", action="store_true", help="print the result as JSON as well")
    args = parse_with_bindings(ap, argv)
    if not args.gin_file and not args.size:
        ap.error("give --size or --gin_file (e.g. --gin_file=models/flan_t5_small.gin)")
    if args.devices is not None and args.devices < 1:
        ap.error("--devices must be >= 1")
    try:
        parse_memory(args.per_chip_memory)
    except ValueError as exc:
        ap.error(str(exc))
    return args


def simulate_devices(count: int) -> None:
    """Make JAX see ``count`` CPU devices (call before JAX's backends start)."""
    flags = os.environ.get("XLA_FLAGS", "")
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", flags).split()
    flags.append(f"--xla_force_host_platform_device_count={count}")
    os.environ["XLA_FLAGS"] = " ".join(flags)
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:
        import jax
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            if jax.device_count() != count or jax.default_backend() != "cpu":
                raise RuntimeError(
                    f"--devices {count}: JAX already started with {jax.device_count()} "
                    f"{jax.default_backend()} devices; run in a fresh process"
                )
            return
        jax.config.update("jax_platforms", "cpu")


def _gin_value(name: str, default: Any = None) -> Any:
    """A bound gin parameter, references evaluated; ``default`` when unbound."""
    import gin

    try:
        value = gin.query_parameter(name)
    except ValueError:
        return default
    if isinstance(value, gin.config.ConfigurableReference):
        return value.scoped_configurable_fn() if value.evaluate else value.scoped_configurable_fn
    return value


def _setup_from_gin(args: argparse.Namespace) -> tuple[Any, str]:
    """The run's set-up as ``run.py`` resolves it (``runner.setup``; the model from a
    model file or the config of an HF or T5X ``INITIAL_CHECKPOINT``), or ``--size``."""
    import jax

    from hir_jax import runner
    from hir_jax.model.configs import get_config
    from hir_jax.partitioning import make_partitioner

    # The run's settings only: the mesh checked is the one ``analyze`` builds from the flags.
    one = make_partitioner(data=1, devices=jax.devices()[:1])
    if args.size:
        spec = runner.setup(model_config=get_config(args.size), partitioner=one)
        return spec, f"flan_t5_{args.size}"
    try:
        spec = runner.setup(partitioner=one)
    except ValueError as exc:
        if "set a model config" not in str(exc):
            raise
        raise ValueError(
            "no model: bind hir_jax.runner.setup.model_config (a gin_configs/models file), "
            "set INITIAL_CHECKPOINT to an HF or T5X checkpoint, or pass --size"
        ) from exc
    name = spec.model_name
    if spec.initial_checkpoint and name == "custom":
        name = os.path.basename(str(spec.initial_checkpoint).rstrip("/")) or "model"
    return spec, name


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the exit status (0 fits, 1 does not fit, 2 bad input)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        if args.devices is not None:
            simulate_devices(args.devices)
        if args.gin_file or args.gin_bindings:
            # Not finalized: a run file's REQUIRED macros (MODEL_DIR, TASK) may stay unset.
            parse_gin(args.gin_file, args.gin_bindings, args.gin_search_path, finalize=False)
        from hir_jax import features

        spec, name = _setup_from_gin(args)
        config, loop = spec.config, spec.loop
        max_new = args.max_new_tokens or loop.max_new_tokens
        kwargs: dict[str, Any] = dict(
            data=args.data,
            model=args.model,
            fsdp=args.fsdp,
            batch=args.batch or loop.batch_size,
            num_microbatches=args.num_microbatches or loop.num_microbatches,
            input_length=args.input_length,
            target_length=args.target_length or features.bucket_length(max_new + 1),
            sample_batch=args.sample_batch or loop.sample_batch_size,
            sample_input_length=args.sample_input_length,
            num_samples=args.num_samples or loop.samples_per_query,
            max_new_tokens=max_new,
            sampler=not args.no_sampler,
            per_chip_memory=args.per_chip_memory,
            method=spec.method,
            optimizer=spec.optimizer,
            loss=spec.base_loss,
        )
        result = analyze(config, **kwargs)
    except Exception as exc:  # bad gin, mesh or shapes: one line, status 2
        if os.environ.get("HIR_JAX_DEBUG"):
            raise
        print(f"error: {one_line(exc)} (HIR_JAX_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    print(format_report(result, name))
    if args.json:
        print(json.dumps({"model": name, "config": dataclasses.asdict(config), **result}))
    return 0 if result["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())

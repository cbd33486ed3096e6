"""Host memory of loading a checkpoint onto a mesh: eager (the whole model read into host
memory, then placed) vs lazy (``checkpoints.lazy``: each device's slice read as it is
placed). Each mode runs in a fresh process; the figure is its peak resident memory.

    python bench/checkpoint_load.py --size base --model 4

On one host the placed parameters live in host memory too (CPU devices), so the lazy
peak is about one copy of the model and the eager peak about two; on a pod, each host's
lazy peak is its own shards only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import common  # noqa: F401 (sys.path)
import numpy as np


def _peak_kib() -> int:
    """This process's peak resident memory (VmHWM; ``ru_maxrss`` survives exec on Linux,
    so a child would inherit the parent's peak)."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1])


def _child(directory: str, mode: str, model: int) -> None:
    import jax

    from hir_jax.checkpoints import load_checkpoint
    from hir_jax.checkpoints.lazy import place
    from hir_jax.partitioning import make_partitioner
    from hir_jax.train import make_optimizer, train_state_shardings

    jax.devices()  # start the backend before the baseline
    before = _peak_kib()
    start = time.perf_counter()
    config, params = load_checkpoint(directory, lazy=mode == "lazy")
    partitioner = make_partitioner(data=1, model=model)
    shardings = train_state_shardings(config, make_optimizer(), partitioner).params
    placed = jax.block_until_ready(place(params, shardings))
    seconds = time.perf_counter() - start
    peak = _peak_kib()
    nbytes = sum(x.nbytes for x in jax.tree.leaves(placed))
    print(json.dumps({"peak_kib": peak - before, "param_bytes": nbytes, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="base", help="a gin_configs/models size")
    parser.add_argument("--model", type=int, default=4, help="model-parallel devices")
    parser.add_argument("--dir", help="an HF checkpoint to load (default: a random one)")
    parser.add_argument("--child", choices=["eager", "lazy"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.dir, args.child, args.model)
        return

    from common import machine, print_summary

    from hir_jax.checkpoints import expected_shapes, save_hf, unflatten
    from hir_jax.model.configs import get_config

    with tempfile.TemporaryDirectory() as tmp:
        directory = args.dir
        if directory is None:
            config = get_config(args.size)
            rng = np.random.default_rng(0)
            flat = {
                k: rng.standard_normal(s, dtype=np.float32)
                for k, s in expected_shapes(config).items()
            }
            directory = os.path.join(tmp, args.size)
            save_hf(directory, config, unflatten(flat))
            del flat
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.model}"}
        results = {}
        for mode in ("eager", "lazy"):
            cmd = [sys.executable, __file__, "--child", mode, "--dir", directory]
            out = subprocess.run(
                [*cmd, "--model", str(args.model)], env=env, check=True, capture_output=True
            )
            results[mode] = json.loads(out.stdout.decode().strip().splitlines()[-1])
    gib = 1024**3
    print(f"{machine()}; {args.size}, model-parallel over {args.model} CPU devices")
    print(f"parameters: {results['lazy']['param_bytes'] / gib:.2f} GiB fp32")
    for mode, r in results.items():
        print(f"{mode}: peak +{r['peak_kib'] * 1024 / gib:.2f} GiB, {r['seconds']:.1f} s")
    print_summary(
        eager_peak_gib=results["eager"]["peak_kib"] * 1024 / gib,
        lazy_peak_gib=results["lazy"]["peak_kib"] * 1024 / gib,
        lazy_vs_eager=results["lazy"]["peak_kib"] / results["eager"]["peak_kib"],
    )


if __name__ == "__main__":
    main()

"""Host memory of reading a checkpoint, eager (the whole model read into host memory
first) vs lazy (``checkpoints.lazy``: a slice or a tensor at a time), for two uses:
"place" puts it on a mesh (what ``runner.run`` does with INITIAL_CHECKPOINT) and "convert"
writes it as a bfloat16 T5X checkpoint (``python -m hir_jax.convert``). Each run is a
fresh process; the figure is its peak resident memory above the start.

    python bench/checkpoint_load.py --size base --model 4

On one host the placed parameters live in host memory too (CPU devices), so the lazy
"place" peak is about one copy of the model and the eager one about two; on a pod, each
host's lazy peak is its own shards only.
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


def _child(directory: str, use: str, mode: str, model: int) -> None:
    import jax

    from hir_jax.checkpoints import load_checkpoint, save_t5x
    from hir_jax.checkpoints.lazy import place
    from hir_jax.partitioning import make_partitioner
    from hir_jax.train import make_optimizer, train_state_shardings

    jax.devices()  # start the backend before the baseline
    before = _peak_kib()
    start = time.perf_counter()
    config, params = load_checkpoint(directory, lazy=mode == "lazy")
    if use == "place":
        partitioner = make_partitioner(data=1, model=model)
        shardings = train_state_shardings(config, make_optimizer(), partitioner).params
        jax.block_until_ready(place(params, shardings))
    else:
        with tempfile.TemporaryDirectory() as out:
            save_t5x(out, params, step=0, dtype="bfloat16")
    seconds = time.perf_counter() - start
    print(json.dumps({"peak_kib": _peak_kib() - before, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="base", help="a gin_configs/models size")
    parser.add_argument("--model", type=int, default=4, help="model-parallel devices")
    parser.add_argument("--dir", help="an HF checkpoint to load (default: a random one)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.dir, *args.child, args.model)
        return

    from common import machine, print_summary

    from hir_jax.checkpoints import expected_shapes, save_hf, unflatten
    from hir_jax.model.configs import get_config

    gib = 1024**3
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
        size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.model}"}
        peaks = {}
        print(f"{machine()}; {args.size} ({size / gib:.2f} GiB on disk), {args.model} devices")
        for use in ("place", "convert"):
            for mode in ("eager", "lazy"):
                cmd = [sys.executable, __file__, "--dir", directory, "--model", str(args.model)]
                out = subprocess.run(
                    [*cmd, "--child", use, mode], env=env, check=True, capture_output=True
                )
                r = json.loads(out.stdout.decode().strip().splitlines()[-1])
                peak = peaks[f"{use}_{mode}_gib"] = r["peak_kib"] * 1024 / gib
                print(f"{use} {mode}: peak +{peak:.2f} GiB, {r['seconds']:.1f} s")
    print_summary(**peaks)


if __name__ == "__main__":
    main()

"""Converts T5 checkpoints between HF, T5X and our training checkpoints.

    python -m hir_jax.convert SRC DST --to hf [--dtype bfloat16] [--vocab DIR]
    python -m hir_jax.convert SRC DST --to t5x [--step N]

SRC is an HF directory, a T5X checkpoint (``checkpoint_<step>`` or its model dir; the
msgpack one or T5X's Orbax one, of which only the parameters are read), or a
MODEL_DIR of ours (the parameters of its latest orbax checkpoint; the model shape comes
from the checkpoint's loop state). The HF output loads in transformers unchanged; the
``spiece.model`` found beside SRC (or given by ``--vocab``) is copied next to it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from hir_jax.checkpoints import find_vocabulary, load_checkpoint, save_hf, save_t5x
from hir_jax.checkpoints.state import StateCheckpointer
from hir_jax.model.configs import T5Config
from hir_jax.paths import as_path


def is_model_dir(path: str) -> bool:
    """True for a MODEL_DIR written by ``run.py`` (it holds orbax checkpoints)."""
    return (as_path(path) / "checkpoints").is_dir()


def load_model_dir(path: str) -> tuple[T5Config, dict[str, Any], int]:
    """(config, params, train step) of a MODEL_DIR's latest checkpoint."""
    ckpt = StateCheckpointer(path)
    latest = ckpt.latest()
    if latest is None:
        raise FileNotFoundError(f"{path}/checkpoints holds no checkpoint")
    loop = ckpt.restore_loop(latest)
    state = ckpt.restore_state(latest, None)
    ckpt.close()
    config = T5Config(**loop["model_shape"])
    params = _to_numpy(state["params"])
    return config, params, int(np.asarray(state["step"]))


def _to_numpy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree, np.float32)


def convert(src: str, dst: str, to: str, dtype: str = "float32", vocab: str | None = None,
            step: int | None = None) -> str:  # fmt: skip
    """Writes SRC's parameters to DST in format ``to`` ("hf" or "t5x"); returns DST."""
    if is_model_dir(src):
        config, params, train_step = load_model_dir(src)
    else:
        config, params = load_checkpoint(src, lazy=True)  # read a tensor at a time
        train_step = 0
    if to == "hf":
        vocab_path = vocab
        if vocab_path is None:
            try:
                vocab_path = str(find_vocabulary(src))
            except FileNotFoundError:
                vocab_path = None
        save_hf(dst, config, params, dtype=dtype, vocabulary=vocab_path)
        return dst
    if to == "t5x":
        return str(save_t5x(dst, params, step if step is not None else train_step, dtype=dtype))
    raise ValueError(f"unknown target format {to!r}: 'hf' or 't5x'")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", help="HF dir, T5X checkpoint, or a MODEL_DIR of ours")
    ap.add_argument("dst", help="output directory")
    ap.add_argument("--to", choices=("hf", "t5x"), required=True)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--vocab", default=None, help="spiece.model to copy (HF output)")
    ap.add_argument("--step", type=int, default=None, help="T5X step (default: train step)")
    args = ap.parse_args(argv)
    try:
        out = convert(args.src, args.dst, args.to, args.dtype, args.vocab, args.step)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

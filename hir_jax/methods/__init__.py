"""The loop's methods (``base.Method``): HIR and the paper's baselines, each chosen in gin
by reference, e.g. ``--gin.METHOD=@hir_jax.methods.FARL()``."""

from hir_jax.methods.base import Method, Sample
from hir_jax.methods.farl import FARL
from hir_jax.methods.grpo import GRPO
from hir_jax.methods.hir import HIR
from hir_jax.methods.ppo import PPO
from hir_jax.methods.sft import SFT
from hir_jax.methods.zero_shot import ZeroShot

__all__ = ["FARL", "GRPO", "HIR", "PPO", "SFT", "Method", "Sample", "ZeroShot"]

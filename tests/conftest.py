"""Test set-up: 8 simulated CPU devices (set before jax initialises), fp32 matmuls."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Loop tests build the same jitted steps run after run: a persistent compilation cache
# (per machine, outside the checkout) compiles each of them once.
jax.config.update(
    "jax_compilation_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "hir_jax_test_xla")
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
import pytest  # noqa: E402
from synthetic_tasks import write_synthetic_bigbench  # noqa: E402


@pytest.fixture(scope="module")
def bigbench_dir(tmp_path_factory):
    """Synthetic BigBench task files; BIGBENCH_DIR points at them for the module."""
    root = write_synthetic_bigbench(tmp_path_factory.mktemp("bigbench"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BIGBENCH_DIR", str(root))
        yield root


@pytest.fixture()
def clean_gin():
    """gin cleared before and after (tests that parse gin configs in this process)."""
    import gin

    gin.clear_config()
    yield
    gin.clear_config()

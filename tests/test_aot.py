"""Ahead-of-time memory check (hir_jax.aot) on 8 simulated CPU devices."""

import json
import os
import subprocess
import sys

import jax
import pytest

from hir_jax import aot, partitioning
from hir_jax.model.configs import get_config
from hir_jax.model.t5 import count_params, param_shapes
from hir_jax.train import make_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = get_config("small")
# Short shapes keep the compiles quick; the per-device parameter/optimizer bytes do not
# depend on them.
SHAPES = dict(batch=8, input_length=64, target_length=16, max_new_tokens=4)


@pytest.fixture(scope="module")
def small_results():
    assert jax.device_count() == 8
    return {
        model: aot.analyze(SMALL, data=8 // model, model=model, per_chip_memory="16GiB", **SHAPES)
        for model in (1, 2)
    }


def test_small_numbers_positive_and_exact(small_results):
    r = small_results[1]
    assert r["mesh"] == {"data": 8, "model": 1} and r["num_devices"] == 8
    for part in ("train", "sampler"):
        for key in ("argument_bytes", "output_bytes", "temp_bytes", "peak_bytes"):
            assert r[part][key] > 0, (part, key)
    train = r["train"]
    # model=1: every parameter replicated; AdamW keeps two fp32 moments per parameter.
    n = count_params(param_shapes(SMALL))
    assert r["num_params"] == n
    assert train["parameter_bytes"] == 4 * n
    assert 2 * 4 * n <= train["optimizer_bytes"] < 2 * 4 * n + 1024
    # The compiled step's arguments are the state plus the batch, and the state is donated.
    assert train["argument_bytes"] == train["state_bytes"] + train["batch_bytes"]
    assert train["alias_bytes"] >= train["state_bytes"]
    assert train["peak_bytes"] >= train["argument_bytes"] + train["temp_bytes"]
    sampler = r["sampler"]
    assert sampler["argument_bytes"] >= train["parameter_bytes"]
    assert sampler["loop_peak_bytes"] == sampler["peak_bytes"] + (
        train["state_bytes"] - train["parameter_bytes"]
    )
    assert r["peak_bytes"] == max(train["peak_bytes"], sampler["loop_peak_bytes"])


def test_per_device_state_shrinks_as_model_axis_grows(small_results):
    one, two = small_results[1], small_results[2]
    assert two["mesh"] == {"data": 4, "model": 2}
    for key in ("parameter_bytes", "optimizer_bytes"):
        # Embedding, attention and MLP kernels split in two; norms and biases replicated.
        assert one["train"][key] / 2 <= two["train"][key] < 0.55 * one["train"][key]
    assert two["sampler"]["argument_bytes"] < one["sampler"]["argument_bytes"]
    assert two["train"]["peak_bytes"] < one["train"]["peak_bytes"]


def test_verdict_flips_with_chip_memory(small_results):
    r = small_results[1]
    assert r["fits"] is True and r["per_chip_memory"] == 16 * 2**30
    assert aot.fits(r, "v5e") and aot.fits(r, r["peak_bytes"])
    assert not aot.fits(r, "1MiB") and not aot.fits(r, r["peak_bytes"] - 1)
    report = aot.format_report(r, "flan_t5_small")
    assert "verdict: fits" in report and "parameters" in report


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_state_ladder_model_1_2_4(size):
    """Per-device state from the shardings alone (no compile): 1 -> 2 -> 4 on the model axis.

    flan_t5_small has 6 heads, so model=4 cannot split its relative-position table: the
    partitioner says so by name.
    """
    config = get_config(size)
    opt = make_optimizer()
    sizes = [1, 2, 4] if config.num_heads % 4 == 0 else [1, 2]
    mem = [aot.state_memory(config, opt, partitioning.make_partitioner(8 // m, m)) for m in sizes]
    for key in ("parameter_bytes", "optimizer_bytes"):
        values = [m[key] for m in mem]
        assert all(v > 0 for v in values)
        assert all(b < a for a, b in zip(values, values[1:], strict=False)), (key, values)
    if len(sizes) < 3:
        with pytest.raises(partitioning.PartitioningError, match="heads.*size 6"):
            aot.analyze(config, data=2, model=4, **SHAPES)


def test_fsdp_shards_parameters_over_data():
    opt = make_optimizer()
    plain = aot.state_memory(SMALL, opt, partitioning.make_partitioner(8, 1))
    fsdp = aot.state_memory(SMALL, opt, partitioning.make_partitioner(8, 1, fsdp=True))
    assert fsdp["parameter_bytes"] < plain["parameter_bytes"] / 4


@pytest.mark.parametrize(
    "text, expected",
    [("16GiB", 16 * 2**30), ("16 GiB", 16 * 2**30), ("80GB", 80 * 10**9), ("512MiB", 2**29)]
    + [("v5p", 95 * 2**30), ("H100", 80 * 2**30), ("1000", 1000), (123, 123)],
)
def test_parse_memory(text, expected):
    assert aot.parse_memory(text) == expected


def test_parse_memory_rejects_garbage():
    with pytest.raises(ValueError, match="cannot parse"):
        aot.parse_memory("lots")


def test_simulate_devices_refuses_a_started_backend(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--foo --xla_force_host_platform_device_count=8")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    aot.simulate_devices(8)  # what JAX already has: fine
    assert os.environ["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=8"
    with pytest.raises(RuntimeError, match="fresh process"):
        aot.simulate_devices(3)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    return subprocess.run(
        [sys.executable, "-m", "hir_jax.aot", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_devices_flag_gin_model_and_exit_status():
    """--devices sets up simulated devices before JAX starts; the model comes from gin;
    exit status 1 when the peak does not fit."""
    out = _cli(
        "--gin_file=runs/hir.gin",
        "--gin_file=models/flan_t5_tiny.gin",
        "--gin.hir_jax.loop.LoopConfig.batch_size=4",
        "--devices=2",
        "--model=2",
        "--input_length=32",
        "--max_new_tokens=4",
        "--no_sampler",
        "--per_chip_memory=1MiB",
    )
    assert out.returncode == 1, out.stderr[-2000:]
    assert "flan_t5_tiny: 0.3M parameters; mesh data=1 x model=2 (2 cpu devices)" in out.stdout
    assert "train step: batch 4 (1 microbatch), encoder 32, decoder 32" in out.stdout
    assert "verdict: does not fit" in out.stdout


def test_cli_bad_mesh_is_one_line_exit_2():
    out = _cli("--size=small", "--devices=3", "--model=2")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "the fixed size 2 does not divide the 3 available devices" in out.stderr


def test_cli_usage_errors():
    out = _cli("--devices", "2")
    assert out.returncode == 2 and "--size or --gin_file" in out.stderr
    out = _cli("--size", "tiny", "--per_chip_memory", "lots")
    assert out.returncode == 2 and "cannot parse memory size" in out.stderr


def test_aot_of_a_farl_run_from_a_t5x_checkpoint_is_the_runs_own_step(
    tmp_path, bigbench_dir, monkeypatch, capsys
):
    """The AOT check resolves the run's set-up (method, loss, T5X config) and compiles the
    very step ``runner.run`` trains: the same compiled-memory figure."""
    import gin

    from hir_jax import features, loop, runner
    from hir_jax.checkpoints import save_t5x
    from hir_jax.gin_cli import parse_gin
    from hir_jax.model.t5 import init_params

    config = get_config("tiny", vocab_size=1024, d_model=32, d_kv=8)
    ckpt = save_t5x(tmp_path / "t5x", init_params(config, jax.random.key(0)), step=3)
    bindings = [
        f"INITIAL_CHECKPOINT = '{ckpt}'",
        "hir_tasks.get_vocabulary.vocab_size = 1024",
        "hir_jax.train.LossConfig.logits_chunk = 4",
        "hir_jax.loop.LoopConfig.batch_size = 8",
        "hir_jax.loop.LoopConfig.max_new_tokens = 4",
    ]
    gin.clear_config()
    try:
        flags = ["--input_length=64", "--target_length=16", "--no_sampler", "--json"]
        code = aot.main(["--gin_file=runs/farl.gin", *[f"--gin.{b}" for b in bindings], *flags])
        assert code == 0, capsys.readouterr().err
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert result["method"] == "farl" and result["loss"] == "nll"
        assert result["config"]["d_model"] == 32  # read from the T5X checkpoint
        assert result["num_params"] == count_params(param_shapes(config))

        # The step the run itself builds: stop the run just before its rounds.
        captured = {}

        def capture(self, state, progress, preemption):
            captured["loop"] = self

        monkeypatch.setattr(loop.Loop, "run", capture)
        gin.clear_config()
        parse_gin(
            ["runs/farl.gin"],
            [*bindings, f"MODEL_DIR = '{tmp_path / 'run'}'", "TASK = 'pet_rule'"],
        )
        spec = runner.setup()
        runner.run()
    finally:
        gin.clear_config()
    the_loop = captured["loop"]
    assert the_loop.loss.logits_chunk == 4 and the_loop.loss.kind == "nll"
    batch = features.abstract_batch(the_loop.loss, 8, 64, 16, spec.partitioner.batch_sharding)
    compiled = the_loop.train_step.lower(spec.abstract_state(), batch).compile()
    stats = compiled.memory_analysis()
    assert stats.temp_size_in_bytes == result["train"]["temp_bytes"]
    assert stats.argument_size_in_bytes == result["train"]["argument_bytes"]


@pytest.mark.parametrize("name", ["ppo", "grpo"])
def test_aot_of_the_rl_steps_counts_reference_and_value_head(name):
    from hir_jax.methods import GRPO, PPO

    config = get_config("tiny", vocab_size=256)
    method = {"ppo": PPO(), "grpo": GRPO()}[name]
    r = aot.analyze(
        config, data=8, model=1, method=method, per_chip_memory="16GiB",
        optimizer=make_optimizer(), batch=8, input_length=32, target_length=8,
        max_new_tokens=4,
    )  # fmt: skip
    train = r["train"]
    assert r["method"] == name and r["loss"] == name and r["fits"]
    n = count_params(param_shapes(config))
    head = (config.d_model + 1) * 4 if name == "ppo" else 0
    # model=1: replicated; the frozen reference is a second copy of the fp32 parameters;
    # AdamW keeps two moments of the parameters and of the value head.
    assert train["parameter_bytes"] == train["reference_bytes"] == 4 * n
    assert train["head_bytes"] == head
    assert train["optimizer_bytes"] >= 2 * (4 * n + head)
    assert train["state_bytes"] >= 2 * 4 * n + head + train["optimizer_bytes"]
    assert "reference model" in aot.format_report(r)

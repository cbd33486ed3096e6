"""The HIR loop across two processes (two "hosts" of two CPU devices each, joined by
``jax.distributed``) gives the same run as one process with four devices, and a SIGTERM
that reaches only one host stops both at the same step, from where they resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest
from run_py_helpers import REPO, free_port, metric_lines, quick_args, run_py, wait_for_test_line

from hir_jax import metrics_log

INTEGER_METRICS = {"round", "step", "split", "new_samples", "buffer_size", "train_steps"}


def _hosts(model_dir, env, port):
    return [
        run_py(
            [
                *quick_args(model_dir),
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            env,
            devices=2,
        )
        for i in range(2)
    ]


def _finish(procs, timeout=400):
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            outs.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


def _assert_same_run(got, want):
    assert [(r["round"], r["split"]) for r in got] == [(r["round"], r["split"]) for r in want]
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys(), (g, w)
        for k in g:
            if k in INTEGER_METRICS:
                assert g[k] == w[k], (k, g, w)
            else:  # cross-process all-reduces sum in another order: float32 rounding only
                assert math.isclose(g[k], w[k], rel_tol=1e-5, abs_tol=1e-6), (k, g[k], w[k])


def test_two_hosts_match_one_host_and_resume_together(tmp_path, bigbench_dir):
    env = {"BIGBENCH_DIR": str(bigbench_dir)}
    single_dir, multi_dir = tmp_path / "single", tmp_path / "multi"
    single = run_py(quick_args(single_dir), env, devices=4)
    hosts = _hosts(multi_dir, env, free_port())
    try:
        # SIGTERM to host 1 only, once round 1 is on disk: both must stop and save.
        assert wait_for_test_line(multi_dir, 1, hosts, timeout=400), hosts[0].communicate()
        hosts[1].send_signal(signal.SIGTERM)
    finally:
        first = _finish(hosts)
    for code, _, err in first:
        assert code == 0, err
        assert "preempted" in err, err
    assert not metrics_log.is_done(multi_dir)
    # Only the chief reports; the other host prints nothing but its final line.
    assert "round 1" in first[0][1] and "round" not in first[1][1], first[1][1]

    second = _finish(_hosts(multi_dir, env, free_port()))
    for code, out, err in second:
        assert code == 0, err
        assert "resumed from" in out + err
    ((code, _, err),) = _finish([single])
    assert code == 0, err

    assert metrics_log.is_done(multi_dir)
    _assert_same_run(metric_lines(multi_dir), metric_lines(single_dir))
    final = [line.rsplit(" ", 1)[-1] for _, out, _ in second for line in out.splitlines()[-1:]]
    assert final[0] == final[1], final  # every host returns the same final accuracy


_PRIMITIVES = """
import json, sys
import numpy as np
from hir_jax import partitioning as part
part.initialize_distributed(sys.argv[1], 2, int(sys.argv[2]))
import jax
p = part.make_partitioner(data=2, model=2)
batch = {"x": np.arange(8 * 3).reshape(8, 3)}          # the same global batch on both hosts
x = p.shard_batch(batch)["x"]
local_rows = sorted({int(v) // 3 for s in x.addressable_shards for v in s.data[:, 0]})
doubled = jax.jit(lambda a: a * 2, out_shardings=p.batch_sharding)(x)
from hir_jax.checkpoints.lazy import LazyTensor, place   # a checkpoint tensor, read lazily
full, reads = np.arange(8 * 4, dtype=np.float32).reshape(8, 4), []
def read(index):
    reads.append([[s.start, s.stop] for s in index])
    return full[index]
sharding = jax.sharding.NamedSharding(p.mesh, jax.sharding.PartitionSpec("data", "model"))
placed = place(LazyTensor(full.shape, np.float32, read, "test"), sharding)
print(json.dumps({
    "reads": reads,
    "placed": part.to_host(placed).tolist(),
    "process": jax.process_index(),
    "local_rows": local_rows,
    "whole": part.to_host(doubled).tolist(),
    "any_true": part.any_process(jax.process_index() == 1),
    "any_false": part.any_process(False),
}))
"""


def test_multihost_primitives_agree_across_processes():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    address = f"localhost:{free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PRIMITIVES, address, str(i)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = []
    for code, out, err in _finish(procs, timeout=120):
        assert code == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    whole = (2 * __import__("numpy").arange(24).reshape(8, 3)).tolist()
    for i, r in enumerate(results):
        assert r["process"] == i
        assert r["whole"] == whole  # every host gets the whole global array back
        assert r["any_true"] is True and r["any_false"] is False
    # Each host placed only its own devices' rows, and together they cover the batch.
    rows = results[0]["local_rows"] + results[1]["local_rows"]
    assert sorted(rows) == list(range(8)), rows  # disjoint halves
    # A lazily read tensor sharded over (data, model): each host read its own 2 quarters.
    full = __import__("numpy").arange(32).reshape(8, 4).tolist()
    assert all(r["placed"] == full for r in results)
    quarters = [q for r in results for q in r["reads"]]
    assert len(quarters) == 4 and all(len(r["reads"]) == 2 for r in results), quarters
    assert sorted(map(str, quarters)) == sorted(
        map(str, [[[a, a + 4], [b, b + 2]] for a in (0, 4) for b in (0, 2)])
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num_processes=2"], "go together"),
        (
            ["--coordinator_address=localhost:1", "--num_processes=2", "--process_id=2"],
            "--process_id must be in 0..1",
        ),
    ],
)
def test_run_py_rejects_incomplete_multihost_flags(flags, message, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    import run as run_py

    with pytest.raises(SystemExit) as exit_info:
        run_py.parse_args(["--gin_file=runs/hir.gin", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err

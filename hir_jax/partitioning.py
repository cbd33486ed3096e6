"""Device mesh, T5X-style logical axis rules, and sharding of parameters, optimizer state, batches.

The model names every parameter and activation dimension with a *logical* axis
(``embed``, ``mlp``, ``heads``, ``vocab``, ``batch``...; see ``hir_jax.model.t5``). This
module maps those names onto a 2-D device mesh with axes ``data`` and ``model``:

* ``batch`` -> ``data`` (data parallelism);
* ``vocab``, ``mlp``, ``heads``, ``joined_kv`` -> ``model`` (tensor parallelism, as in T5X);
* ``embed``, ``kv``, ``length``, ``relpos_buckets`` -> replicated, unless ``fsdp=True``,
  which also shards parameters' ``embed`` dimension over ``data`` (ZeRO-3/FSDP-style memory
  savings; activations keep ``batch`` on ``data``).

One device and many devices run the same code: a 1x1 mesh is just a mesh. On a multi-host
TPU slice (or several GPU hosts) call ``initialize_distributed()`` once at start-up, before
any other JAX call; ``create_mesh`` then sees every device of every host. Host-side data is
*global and identical on every process* (HIR's data is small and every step is seeded):
``shard_batch`` places on each host only the rows its devices hold, ``to_host`` brings
sharded results back whole to every host, and ``any_process`` agrees on a flag (e.g.
"SIGTERM seen") so that all hosts take the same branch.

Typical use::

    part = make_partitioner(data=-1, model=1)          # all devices on "data"
    params = part.shard_params(params, config)         # NamedSharding per parameter
    batch = part.shard_batch(numpy_batch)              # leading dim over "data"
    with part.context():                               # inside a jitted function: lets
        logits = model.apply(...)                      # nn.with_logical_constraint resolve

A dimension that does not divide its mesh axis raises ``PartitioningError`` naming the
parameter, its logical axes and the mesh, instead of XLA's opaque message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA = "data"
MODEL = "model"
MESH_AXES = (DATA, MODEL)

Rules = tuple[tuple[str, str | None], ...]


class PartitioningError(ValueError):
    """A mesh, rule or shape problem, explained in terms of parameter and axis names."""


# --------------------------------------------------------------------------- mesh


def _resolve_axis_sizes(data: int, model: int, num_devices: int) -> tuple[int, int]:
    sizes = {DATA: data, MODEL: model}
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise PartitioningError(f"mesh axis {name!r} size must be positive or -1, got {size}")
    if data == -1 and model == -1:
        raise PartitioningError("at most one of the mesh sizes data/model may be -1")
    if data == -1 or model == -1:
        known = model if data == -1 else data
        if num_devices % known:
            raise PartitioningError(
                f"mesh data={data}, model={model}: the fixed size {known} does not divide "
                f"the {num_devices} available devices"
            )
        rest = num_devices // known
        return (rest, model) if data == -1 else (data, rest)
    if data * model != num_devices:
        raise PartitioningError(
            f"mesh data={data} x model={model} = {data * model} devices, but "
            f"{num_devices} devices are available; use -1 for one axis to take the rest"
        )
    return data, model


def create_mesh(data: int = -1, model: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``Mesh`` with axes ("data", "model"); -1 for one axis means "all remaining devices".

    ``devices`` defaults to ``jax.devices()`` (every device of every host after
    ``jax.distributed.initialize()``). The device order follows
    ``mesh_utils.create_device_mesh`` (topology-aware on TPU) when it applies.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = _resolve_axis_sizes(data, model, len(devices))
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # noqa: BLE001 - unusual device sets: plain row-major order
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


# --------------------------------------------------------------------------- rules


def logical_axis_rules(fsdp: bool = False) -> Rules:
    """T5X's standard rules (``batch``->data; ``vocab/mlp/heads/joined_kv``->model).

    Rules are tried in order and a mesh axis is used at most once per array, so with
    ``fsdp`` a parameter's ``embed`` goes to ``data`` while an activation's ``embed``
    (whose ``batch`` already took ``data``) stays replicated.
    """
    rules: list[tuple[str, str | None]] = [
        ("batch", DATA),
        ("vocab", MODEL),
        ("mlp", MODEL),
        ("heads", MODEL),
        ("joined_kv", MODEL),
    ]
    if fsdp:
        rules.append(("embed", DATA))
    rules += [("embed", None), ("kv", None), ("length", None), ("relpos_buckets", None)]
    return tuple(rules)


def _known_names(rules: Rules) -> set[str]:
    return {name for name, _ in rules}


def logical_to_mesh_spec(
    logical: PartitionSpec | Sequence[str | None], rules: Rules
) -> PartitionSpec:
    """Mesh ``PartitionSpec`` of one array from its logical axis names.

    Same resolution as ``nn.with_logical_constraint`` (flax's ``logical_to_mesh_axes``);
    unknown logical names raise instead of being silently replicated.
    """
    names = tuple(logical)
    unknown = [n for n in names if n is not None and n not in _known_names(rules)]
    if unknown:
        raise PartitioningError(
            f"logical axes {names}: no rule for {unknown}; "
            f"rules cover {sorted(_known_names(rules))}"
        )
    return nn.logical_to_mesh_axes(names, rules)


def _axis_size(mesh: Mesh, axis: str | tuple[str, ...] | None) -> int:
    if axis is None:
        return 1
    axes = (axis,) if isinstance(axis, str) else tuple(axis)
    return math.prod(mesh.shape[a] for a in axes)


def check_divisible(
    name: str,
    shape: Sequence[int],
    spec: PartitionSpec,
    mesh: Mesh,
    logical: Sequence[str | None] | None = None,
) -> None:
    """Raise ``PartitioningError`` naming ``name`` if a dimension does not divide its mesh axis."""
    for dim, (size, axis) in enumerate(zip(shape, tuple(spec), strict=False)):
        n = _axis_size(mesh, axis)
        if size % n:
            logical_name = logical[dim] if logical is not None and dim < len(logical) else None
            raise PartitioningError(
                f"{name}: shape {tuple(shape)}, logical axes {tuple(logical or ())}, mesh spec "
                f"{spec}: dimension {dim} (logical {logical_name!r}, size {size}) is not "
                f"divisible by mesh axis {axis!r} of size {n} (mesh {dict(mesh.shape)}). "
                f"Pick a mesh whose {axis!r} size divides {size}, or map {logical_name!r} to "
                f"None in the logical axis rules."
            )


def _path_name(path: tuple[Any, ...]) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def param_mesh_specs(param_axes: Any, rules: Rules) -> Any:
    """Tree of mesh ``PartitionSpec`` from a tree of logical ``PartitionSpec``."""
    return jax.tree.map(lambda s: logical_to_mesh_spec(s, rules), param_axes, is_leaf=_is_spec)


def param_shardings(param_axes: Any, mesh: Mesh, rules: Rules, shapes: Any | None = None) -> Any:
    """Tree of ``NamedSharding`` for the parameters, given their logical axes.

    ``param_axes`` is ``hir_jax.model.t5.param_logical_axes(config)``; with ``shapes`` (a
    matching tree of arrays or ``ShapeDtypeStruct``) every dimension is checked against
    its mesh axis and a clear ``PartitioningError`` is raised when one does not divide.
    """
    flat_axes, treedef = jax.tree_util.tree_flatten_with_path(param_axes, is_leaf=_is_spec)
    if shapes is not None:
        flat_shapes = treedef.flatten_up_to(shapes)
    out = []
    for i, (path, logical) in enumerate(flat_axes):
        name = _path_name(path)
        try:
            spec = logical_to_mesh_spec(logical, rules)
        except PartitioningError as e:
            raise PartitioningError(f"{name}: {e}") from None
        if shapes is not None:
            check_divisible(name, flat_shapes[i].shape, spec, mesh, tuple(logical))
        out.append(NamedSharding(mesh, spec))
    return treedef.unflatten(out)


def shard_params(params: Any, mesh: Mesh, rules: Rules, param_axes: Any) -> Any:
    """Place ``params`` (host or device arrays) on ``mesh`` according to their logical axes."""
    shardings = param_shardings(param_axes, mesh, rules, shapes=params)
    return jax.device_put(params, shardings)


def opt_state_shardings(tx: Any, params: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Shardings of ``tx.init(params)``, derived from the parameter shardings.

    Optax states hold trees that mirror the parameters (Adam's ``mu``/``nu``...). Each
    state leaf whose key path ends with a parameter's path takes that parameter's sharding
    when the shapes agree; Adafactor's factored moments (the parameter's shape with one
    axis dropped) take the parameter's spec without that axis; everything else (step
    counts, scalars, placeholders) is replicated. ``params`` may be abstract
    (``ShapeDtypeStruct``); nothing is allocated.
    """
    abstract_state = jax.eval_shape(tx.init, params)
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_sh = jax.tree.leaves(params_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    by_path = {
        tuple(_path_name((k,)) for k in path): (leaf.shape, sh.spec)
        for (path, leaf), sh in zip(flat_params, flat_sh, strict=True)
    }
    max_len = max((len(p) for p in by_path), default=0)
    replicated = NamedSharding(mesh, PartitionSpec())

    def for_leaf(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        names = tuple(_path_name((k,)) for k in path)
        for n in range(min(len(names), max_len), 0, -1):
            match = by_path.get(names[-n:])
            if match is None:
                continue
            shape, spec = match
            spec_t = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
            if tuple(leaf.shape) == tuple(shape):
                return NamedSharding(mesh, PartitionSpec(*spec_t))
            if len(leaf.shape) == len(shape) - 1:
                candidates = {
                    spec_t[:d] + spec_t[d + 1 :]
                    for d in range(len(shape))
                    if tuple(shape[:d]) + tuple(shape[d + 1 :]) == tuple(leaf.shape)
                }
                if len(candidates) == 1:
                    return NamedSharding(mesh, PartitionSpec(*candidates.pop()))
            return replicated
        return replicated

    return jax.tree_util.tree_map_with_path(for_leaf, abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over ``data``, every other dimension replicated."""
    return NamedSharding(mesh, PartitionSpec(DATA))


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Put a batch (dict of host arrays, leading dim = examples) on the mesh, split over data.

    ``batch`` is the *global* batch, the same on every process (multi-host: each host
    copies only the rows of its own devices). Arrays already laid out over ``data`` are
    passed through unchanged.
    """
    sharding = batch_sharding(mesh)
    n_data = mesh.shape[DATA]
    out = {}
    for key, value in batch.items():
        if isinstance(value, jax.Array) and value.ndim and value.sharding == sharding:
            out[key] = value  # already in place
            continue
        arr = value if isinstance(value, jax.Array) else np.asarray(value)
        if arr.ndim == 0 or arr.shape[0] % n_data:
            rows = arr.shape[0] if arr.ndim else "(none: a scalar)"
            raise PartitioningError(
                f"batch[{key!r}] has shape {tuple(arr.shape)}: its leading (batch) dimension "
                f"{rows} is not divisible by mesh axis 'data' of size {n_data} "
                f"(mesh {dict(mesh.shape)})"
            )
        out[key] = jax.device_put(arr, sharding)
    return out


def to_host(tree: Any) -> Any:
    """NumPy copies of a tree of arrays, whole on every process.

    Single process: ``jax.device_get``. Multi-process: arrays split across hosts (e.g.
    generated tokens over ``data``) are all-gathered first, so every host continues with
    the same global values.
    """
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def fetch(x: Any) -> Any:
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return jax.device_get(x)

    return jax.tree.map(fetch, tree)


def any_process(flag: bool) -> bool:
    """True if ``flag`` is true on any process; every process gets the same answer.

    A collective in multi-process runs: call it at the same points on every host.
    """
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray([flag], np.int32))
    return bool(np.any(flags))


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """``jax.distributed.initialize`` for a multi-host run; call before any other JAX use.

    Without arguments JAX detects the cluster (TPU VM slices, SLURM, Open MPI). GPU hosts
    without a scheduler pass all three: the coordinator ``host:port`` (process 0's host),
    the number of processes and this process's index.
    """
    given = [a is not None for a in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError(
            "give all of coordinator_address, num_processes and process_id, or none of "
            "them (automatic detection on TPU VMs, SLURM and Open MPI)"
        )
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )


@contextlib.contextmanager
def logical_context(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Makes ``nn.with_logical_constraint`` in model code resolve against ``mesh``/``rules``.

    Enter it *inside* the function that ``jax.jit`` traces (it sets the abstract mesh,
    which is allowed under ``jit``; ``jax.set_mesh`` is not); outside any mesh context the
    model's constraints are no-ops.
    """
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
        yield


# --------------------------------------------------------------------------- partitioner


@functools.lru_cache(maxsize=32)
def _config_param_shardings(mesh: Mesh, rules: Rules, config: Any) -> Any:
    from hir_jax.model.t5 import param_logical_axes, param_shapes

    return param_shardings(param_logical_axes(config), mesh, rules, shapes=param_shapes(config))


@dataclasses.dataclass(frozen=True)
class Partitioner:
    """A mesh and its logical axis rules, with the helpers the train/decode code needs."""

    mesh: Mesh
    rules: Rules

    @property
    def data_size(self) -> int:
        return self.mesh.shape[DATA]

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def batch_sharding(self) -> NamedSharding:
        return batch_sharding(self.mesh)

    def param_shardings(self, config: Any) -> Any:
        """Shardings of a ``T5Config``'s parameters (checked for divisibility)."""
        cached = _config_param_shardings(self.mesh, self.rules, config)
        return jax.tree.map(lambda s: s, cached)  # a fresh tree: callers may edit it

    def shard_params(self, params: Any, config: Any) -> Any:
        """Place a parameter tree of ``config`` on the mesh."""
        return jax.device_put(params, self.param_shardings(config))

    def opt_state_shardings(self, tx: Any, config: Any) -> Any:
        """Shardings of ``tx.init(params)`` for ``config``'s parameters."""
        from hir_jax.model.t5 import param_shapes

        return opt_state_shardings(
            tx, param_shapes(config), self.param_shardings(config), self.mesh
        )

    def shard_batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        return shard_batch(batch, self.mesh)

    def context(self) -> contextlib.AbstractContextManager[None]:
        """``logical_context(mesh, rules)``: enter inside jitted functions."""
        return logical_context(self.mesh, self.rules)


@gin.configurable(module="hir_jax.partitioning")
def make_partitioner(
    data: int = -1,
    model: int = 1,
    fsdp: bool = False,
    devices: Sequence[Any] | None = None,
) -> Partitioner:
    """Gin entry point: mesh sizes (-1 = the rest) and the FSDP option."""
    return Partitioner(create_mesh(data, model, devices), logical_axis_rules(fsdp))

"""Device mesh, logical-axis rules and shardings: parameters, batches and activations.

Every parameter is declared once with logical axes (models.param_specs: e.g. wq = ("layers", "embed", "heads",
"head_dim")). The experiment's MeshConfig.rules map each logical axis to mesh axes (defaults: batch -> (data, fsdp),
embed -> fsdp, heads / kv_heads / mlp / vocab -> tensor, the rest replicated). This module turns those rules into
PartitionSpecs and NamedShardings, checking each parameter as it goes, so a rule that cannot work fails before anything
is compiled, with a message naming the parameter, its shape, the logical axis and the mesh axis.

The same code runs on one CPU device, on 8 simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)
and on a multi-host pod (MeshConfig.distributed -> jax.distributed.initialize()).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from starling_jax.config import MeshConfig
from starling_jax.models.transformer import ParamSpec, init_from_specs, is_spec

MESH_AXES = ("data", "fsdp", "tensor")
# Activations between layers, x [B, T, D]: split over the batch only (FSDP/data parallel); tensor-parallel matmuls
# all-gather/reduce inside a layer, so the residual stream is replicated over `tensor`.
ACTIVATION_AXES = ("batch", None, None)

Rules = Mapping[str, Any]  # logical axis -> None | mesh axis | tuple of mesh axes


# ----------------------------------------------------------------------------------------------------------------------
# Mesh and multi-host setup.


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joins a multi-process run (jax.distributed.initialize). Fields left None are read from the
    environment: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, or a cluster JAX detects itself (SLURM:
    SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID, with JAX_COORDINATOR_PORT; Cloud TPU;
    Open MPI). Timeouts bound every wait: joining (init_timeout_s), a peer that stops answering (heartbeat_timeout_s:
    the others then abort instead of hanging) and the shutdown barrier (shutdown_timeout_s)."""
    coordinator: Optional[str] = None  # "host:port" of process 0's coordination service
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    init_timeout_s: int = 300
    heartbeat_timeout_s: int = 100
    shutdown_timeout_s: int = 300

    @property
    def explicit(self) -> bool:
        """True when a flag or JAX_* variable names a multi-process run (distributed even if the config says not)."""
        return self.resolved().coordinator is not None

    def resolved(self) -> "Launch":
        """The fields with the JAX_* environment variables filled in where a flag left them None."""
        env = os.environ

        def as_int(name):
            value = env.get(name)
            if value is None:
                return None
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"environment variable {name}={value!r} is not an integer") from None
        return dataclasses.replace(
            self, coordinator=self.coordinator or env.get("JAX_COORDINATOR_ADDRESS"),
            num_processes=self.num_processes if self.num_processes is not None else as_int("JAX_NUM_PROCESSES"),
            process_id=self.process_id if self.process_id is not None else as_int("JAX_PROCESS_ID"))


def initialize_distributed(config: MeshConfig, launch: Optional[Launch] = None) -> None:
    """Join a multi-process run when the config asks for it (mesh.distributed) or the launch names a coordinator.

    Must run before anything touches a device; calling it again is harmless. On CPU the cross-process collectives are
    gloo's (XLA's default CPU client has none). Raises ValueError with one line when the coordinator, the process
    count or the process id cannot be determined, or they are inconsistent."""
    launch = (launch or Launch()).resolved()
    if not (config.distributed or launch.explicit) or jax.distributed.is_initialized():
        return
    given = {"coordinator": launch.coordinator, "num_processes": launch.num_processes,
             "process_id": launch.process_id}
    if launch.explicit and None in given.values():
        missing = [k for k, v in given.items() if v is None]
        raise ValueError(f"multi-process launch: coordinator {launch.coordinator!r} given but not "
                         f"{' / '.join(missing)} (use --num-processes/--process-id or JAX_NUM_PROCESSES/"
                         f"JAX_PROCESS_ID)")
    if launch.num_processes is not None and launch.process_id is not None and not (
            launch.num_processes >= 1 and 0 <= launch.process_id < launch.num_processes):
        raise ValueError(f"multi-process launch: process id {launch.process_id} is not in [0, "
                         f"{launch.num_processes}) processes")
    for name in ("init_timeout_s", "heartbeat_timeout_s", "shutdown_timeout_s"):
        if getattr(launch, name) < 1:
            raise ValueError(f"multi-process launch: {name} must be >= 1 second, got {getattr(launch, name)}")
    previous = jax.config.jax_cpu_collectives_implementation
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(launch.coordinator, launch.num_processes, launch.process_id,
                                   initialization_timeout=launch.init_timeout_s,
                                   heartbeat_timeout_seconds=launch.heartbeat_timeout_s,
                                   shutdown_timeout_seconds=launch.shutdown_timeout_s)
    except ValueError as e:  # no coordinator: neither flags, JAX_* variables nor a detected cluster
        jax.config.update("jax_cpu_collectives_implementation", previous)
        raise ValueError(f"mesh.distributed: cannot join a multi-process run ({e}); give --coordinator HOST:PORT "
                         f"--num-processes N --process-id I (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                         f"JAX_PROCESS_ID), run under SLURM, or set mesh.distributed=false") from None


def mesh_shape(config: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes for `num_devices`; one axis may be -1 (it takes the devices the others leave)."""
    sizes = [config.data, config.fsdp, config.tensor]
    free = [i for i, s in enumerate(sizes) if s == -1]
    bad = [f"{name}={s}" for name, s in zip(MESH_AXES, sizes) if s == 0 or s < -1]
    if bad or len(free) > 1:
        raise ValueError(f"mesh: sizes must be positive with at most one -1, got data={config.data}, "
                         f"fsdp={config.fsdp}, tensor={config.tensor}")
    fixed = math.prod(s for s in sizes if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes "
                             f"({' x '.join(f'{n}={s}' for n, s in zip(MESH_AXES, sizes) if s != -1)} = {fixed})")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh: data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} devices, "
                         f"but {num_devices} are available; use -1 on one axis to take the rest")
    return tuple(sizes)


def make_mesh(config: MeshConfig, devices: Optional[Sequence[jax.Device]] = None,
              launch: Optional[Launch] = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types over `devices` (default: all devices of all processes)."""
    initialize_distributed(config, launch)
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def process_rows(sharding: NamedSharding, batch_size: int) -> list[int]:
    """The rows of a global batch of `batch_size` (leading axis sharded by `sharding`) that this process's devices
    hold, in increasing order: what this process reads from the data and passes to put_batch. On one process, all of
    them; on several, each its own block (or, when the batch is replicated over processes, the same rows)."""
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map((batch_size,)).values():
        rows.update(range(batch_size)[index[0]])
    return sorted(rows)


# ----------------------------------------------------------------------------------------------------------------------
# Logical axes -> PartitionSpec.


# Logical axes that stay whole on every device whatever the rules say: a LoRA adapter's rank (models/lora.py; a few
# columns, contracted right after the matmul that makes them).
NEVER_SHARDED = ("lora_rank",)


def rules_dict(rules) -> dict[str, Any]:
    """MeshConfig.rules (a tuple of (logical, mesh) pairs) or a mapping -> dict; a logical name given twice is an
    error."""
    if isinstance(rules, MeshConfig):
        rules = rules.rules
    if isinstance(rules, Mapping):
        return dict(rules)
    out: dict[str, Any] = {}
    for item in rules:
        if len(item) != 2:
            raise ValueError(f"mesh.rules: each rule must be a (logical_axis, mesh_axes) pair, got {item!r}")
        name, target = item
        if name in out:
            raise ValueError(f"mesh.rules: logical axis {name!r} has two rules ({out[name]!r} and {target!r})")
        out[name] = target
    return out


def _as_tuple(target) -> tuple[str, ...]:
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def logical_to_spec(axes: Sequence[Optional[str]], rules, mesh: Optional[Mesh] = None,
                    shape: Optional[Sequence[int]] = None, name: str = "array") -> PartitionSpec:
    """PartitionSpec for an array with logical `axes`. With `mesh` and `shape`, also checks that the mesh axes exist,
    that no mesh axis is used twice, and that each dimension divides by the product of its mesh axes' sizes.
    `name` (e.g. the parameter path) goes into every error message."""
    rules = rules_dict(rules)
    where = f"{name} (shape {tuple(shape)}, logical axes {tuple(axes)})" if shape is not None else \
        f"{name} (logical axes {tuple(axes)})"
    if shape is not None and len(shape) != len(axes):
        raise ValueError(f"{where}: {len(axes)} logical axes for a {len(shape)}-d array")
    used: dict[str, str] = {}
    parts = []
    for dim, logical in enumerate(axes):
        if logical is None or logical in NEVER_SHARDED:
            parts.append(None)
            continue
        if logical not in rules:
            raise ValueError(f"{where}: no rule for logical axis {logical!r}; mesh.rules covers "
                             f"{', '.join(sorted(rules))}")
        targets = _as_tuple(rules[logical])
        for ax in targets:
            if mesh is not None and ax not in mesh.shape:
                raise ValueError(f"{where}: rule {logical!r} -> {rules[logical]!r} names mesh axis {ax!r}, but the "
                                 f"mesh has axes {tuple(mesh.shape)}")
            if ax in used:
                raise ValueError(f"{where}: mesh axis {ax!r} is used twice, by logical axes {used[ax]!r} and "
                                 f"{logical!r} (rule collision: each mesh axis may shard one dimension)")
            used[ax] = logical
        if mesh is not None and shape is not None and targets:
            size = math.prod(mesh.shape[ax] for ax in targets)
            if shape[dim] % size:
                sizes = " x ".join(f"{ax}={mesh.shape[ax]}" for ax in targets)
                raise ValueError(f"{where}: dimension {dim} of size {shape[dim]} (logical axis {logical!r}) is not "
                                 f"divisible by mesh axis {sizes} = {size}; change the mesh or the rule "
                                 f"(e.g. map {logical!r} to None)")
        parts.append(targets[0] if len(targets) == 1 else (targets or None))
    return PartitionSpec(*parts)


def _path_name(path) -> str:
    return "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def param_shardings(specs, mesh: Mesh, rules) -> Any:
    """Tree of NamedSharding for a ParamSpec tree (models.param_specs, value_head_specs, or a respec'd split tree).
    Raises on the first parameter whose rule collides or does not divide its shape."""
    def one(path, spec: ParamSpec):
        return NamedSharding(mesh, logical_to_spec(spec.axes, rules, mesh, spec.shape, _path_name(path)))
    return jax.tree.map_with_path(one, specs, is_leaf=is_spec)


def respec(abstract, specs) -> Any:
    """ParamSpecs for `abstract` (a tree of arrays or ShapeDtypeStructs whose dict keys follow `specs`, e.g. the
    trainable / frozen halves of models.split_params, which slice the `layers` axis): each leaf keeps the logical
    axes, init and dtype of the spec at the same path, with the leaf's own shape."""
    def one(path, leaf):
        node = specs
        for p in path:
            key = getattr(p, "key", None)
            if not isinstance(node, Mapping) or key not in node:
                raise KeyError(f"respec: no parameter spec at {_path_name(path)!r}")
            node = node[key]
        if not is_spec(node):
            raise KeyError(f"respec: {_path_name(path)!r} is a subtree in the specs, not a parameter")
        return ParamSpec(tuple(leaf.shape), node.axes, node.init, str(np.dtype(leaf.dtype)))
    return jax.tree.map_with_path(one, abstract)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def init_sharded(specs, key: jax.Array, std: float, mesh: Mesh, rules) -> Any:
    """Materialise a ParamSpec tree directly into its shards (jit with out_shardings): each device computes only its
    own slices, so no host ever holds the whole model. Values equal init_from_specs(specs, key, std) (threefry random
    numbers do not depend on the sharding)."""
    shardings = param_shardings(specs, mesh, rules)
    return jax.jit(lambda k: init_from_specs(specs, k, std), out_shardings=shardings)(key)


# ----------------------------------------------------------------------------------------------------------------------
# Batches and activations.


def batch_spec(ndim: int, rules) -> PartitionSpec:
    """A batch array's spec: the leading axis follows the "batch" rule, the rest are replicated."""
    return logical_to_spec(("batch",) + (None,) * (ndim - 1), rules)


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh, rules) -> dict[str, NamedSharding]:
    """NamedSharding for every array of a batch dict (numpy arrays or ShapeDtypeStructs; global shapes), checking that
    each leading dimension divides by the batch axes' devices."""
    out = {}
    for k, v in batch.items():
        shape = tuple(v.shape)
        axes = ("batch",) + (None,) * (len(shape) - 1)
        out[k] = NamedSharding(mesh, logical_to_spec(axes, rules, mesh, shape, f"batch[{k!r}]"))
    return out


def put_batch(batch: Mapping[str, Any], shardings: Mapping[str, NamedSharding]) -> dict[str, jax.Array]:
    """Place this process's rows of a batch (numpy, rows process_rows(...) of the global batch) on the mesh as global
    arrays. On one process `batch` is the global batch. Arrays that are already global jax.Arrays are resharded."""
    out = {}
    for k, local in batch.items():
        sh = shardings[k]
        if isinstance(local, jax.Array) and not local.is_fully_addressable:
            out[k] = local if local.sharding == sh else jax.jit(lambda a: a, out_shardings=sh)(local)
            continue
        local = np.asarray(local)
        parts = _batch_parts(sh)
        global_shape = (local.shape[0] * parts // len(process_rows(sh, parts)),) + local.shape[1:]
        out[k] = jax.make_array_from_process_local_data(sh, local, global_shape)
    return out


def _batch_parts(sharding: NamedSharding) -> int:
    """Into how many blocks `sharding` splits an array's leading axis."""
    spec = tuple(sharding.spec)
    return math.prod(sharding.mesh.shape[ax] for ax in _as_tuple(spec[0])) if spec else 1


def local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a global array whose leading axis is split over the batch axes (the inverse of
    put_batch): its addressable shards, in row order, each row once."""
    if array.is_fully_addressable:
        return np.asarray(array)
    pieces = {}
    for shard in array.addressable_shards:
        start = (shard.index[0].start or 0) if shard.index else 0
        pieces.setdefault(start, shard)
    return np.concatenate([np.asarray(pieces[s].data) for s in sorted(pieces)], axis=0)


def gather(tree) -> Any:
    """The whole value of every global array in `tree` as numpy, on every process (a cross-process all-gather when
    the arrays are not fully addressable; the caller's host sync). Numpy leaves pass through."""
    def one(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return np.asarray(a)
    return jax.tree_util.tree_map(one, tree)


def replicate(tree, mesh: Mesh) -> Any:
    """Numpy arrays every process holds identically -> global arrays replicated over `mesh` (e.g. evaluation prompts
    that every device processes whole)."""
    sh = replicated(mesh)
    return jax.tree_util.tree_map(lambda a: jax.make_array_from_process_local_data(sh, np.asarray(a), np.shape(a)),
                                  tree)


def describe_rows(stage: str, rows: Sequence[int], batch_size: int) -> None:
    """Several processes: each logs which rows of every global batch it reads (one line per process)."""
    if jax.process_count() > 1:
        logging.getLogger(__name__).info("[%s] process %d of %d reads rows %s of each global batch of %d", stage,
                                         jax.process_index(), jax.process_count(), list(rows), batch_size)


class BatchPlacement:
    """Moves batch arrays between this process's rows (numpy, rows process_rows(...) of the global batch) and global
    arrays whose leading axis is split over the mesh's batch axes. Host-side code that works row by row (decoding
    text, tokenizing for the reward model, true utilities) runs on the local rows; jitted functions take the global
    arrays; statistics that must agree across processes (reward moments, the KL controller) read `whole`. On one
    process local rows are the whole batch and every method is a placement or a device_get."""

    def __init__(self, mesh: Mesh, rules):
        self.mesh, self.rules = mesh, rules
        self._batch = NamedSharding(mesh, batch_spec(1, rules))

    def sharding(self, ndim: int) -> NamedSharding:
        return NamedSharding(self.mesh, batch_spec(ndim, self.rules))

    @property
    def parts(self) -> int:
        """Into how many blocks the batch axes split a batch (a global batch size must be a multiple of it)."""
        return _batch_parts(self._batch)

    def rows(self, batch_size: int) -> list[int]:
        """The rows of a global batch of `batch_size` that this process reads."""
        return process_rows(self._batch, batch_size)

    def global_size(self, local_size: int) -> int:
        return local_size * self.parts // len(process_rows(self._batch, self.parts))

    def shardings(self, batch: Mapping[str, Any]) -> dict[str, NamedSharding]:
        """batch_shardings for a batch of local rows (checked against the global shapes)."""
        return batch_shardings({k: jax.ShapeDtypeStruct((self.global_size(np.shape(v)[0]),) + np.shape(v)[1:],
                                                        np.asarray(v).dtype) for k, v in batch.items()},
                               self.mesh, self.rules)

    def put(self, *arrays):
        """Local rows -> global arrays (one array, or a tuple for several)."""
        out = tuple(put_batch({"x": a}, {"x": self.sharding(np.ndim(a))})["x"] for a in arrays)
        return out[0] if len(out) == 1 else out

    def local(self, array) -> np.ndarray:
        """This process's rows of a global array (resharded over the batch axes first if XLA left it otherwise)."""
        if not isinstance(array, jax.Array):
            return np.asarray(array)
        target = self.sharding(array.ndim)
        if not array.sharding.is_equivalent_to(target, array.ndim):
            array = jax.jit(lambda a: a, out_shardings=target)(array)
        return local_rows(array)

    def whole(self, array) -> np.ndarray:
        """Every row of the global batch, on every process: a global array, or this process's local rows (numpy),
        which are placed first."""
        if not isinstance(array, jax.Array):
            array = self.put(np.asarray(array))
        return gather(array)

    def max(self, value: int) -> int:
        """The largest of an integer over all processes (e.g. a padded length every process must use)."""
        if jax.process_count() == 1:
            return int(value)
        from jax.experimental import multihost_utils
        return int(np.max(multihost_utils.process_allgather(np.asarray([value], np.int64))))


class ActivationConstraint:
    """Sharding constraints for a model's forward on a mesh. Called on x [B, T, D] it pins the residual stream to
    ACTIVATION_AXES (pass it as models.run_layers(constrain=...)): pinning at layer boundaries keeps XLA from choosing
    a layout that all-gathers the batch. `embedding(table)` pins the embedding table [V, D] to (vocab, -) for the
    lookup: gathered over fsdp like any FSDP weight, so the looked-up rows come out replicated over the batch axes and
    split locally, instead of sharded over D, which XLA can only re-split by replicating the whole activation."""

    def __init__(self, mesh: Mesh, rules):
        self.mesh = mesh
        self._rules = rules_dict(rules)
        self.activations = NamedSharding(mesh, logical_to_spec(ACTIVATION_AXES, rules, mesh))
        self.table = NamedSharding(mesh, logical_to_spec(("vocab", None), rules, mesh))
        self.cache = NamedSharding(mesh, logical_to_spec((None, "batch", None, "kv_heads", None), rules, mesh))
        self.replicated = NamedSharding(mesh, PartitionSpec())

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, self.activations)

    def embedding(self, table: jax.Array) -> jax.Array:
        return jax.lax.with_sharding_constraint(table, self.table)

    def whole(self, x: jax.Array) -> jax.Array:
        """x replicated on every device (for a decode step's one-token activations, see sampling.decode_step)."""
        return jax.lax.with_sharding_constraint(x, self.replicated)

    def kv_cache(self, kv: jax.Array) -> jax.Array:
        """A KV cache array [L, B, S, K, E] split over the batch axes and the kv heads (the kv_heads rule)."""
        return jax.lax.with_sharding_constraint(kv, self.cache)

    def attention_specs(self, batch: int, heads: int, kv_heads: int):
        """PartitionSpecs (q [B, T, H, E], k/v [B, S, K, E], segment ids [B, T]) of a kernel that runs per device under
        shard_map (models.attention_ops' splash): rows over the "batch" rule's mesh axes, query and kv heads over
        the "heads" rule's when "kv_heads" maps to the same axes (each device then holds whole GQA groups). An axis
        that does not divide its dimension is left unsplit (the kernel then runs on every row or head of that
        dimension, replicated)."""
        def split(rule, size):
            axes = tuple(ax for ax in _as_tuple(self._rules.get(rule)) if self.mesh.shape[ax] > 1)
            return (axes if len(axes) > 1 else axes[0]) if axes and size % math.prod(
                self.mesh.shape[ax] for ax in axes) == 0 else None
        b = split("batch", batch)
        same = _as_tuple(self._rules.get("heads")) == _as_tuple(self._rules.get("kv_heads"))
        h = split("heads", heads) if same and split("kv_heads", kv_heads) is not None else None
        return PartitionSpec(b, None, h, None), PartitionSpec(b, None, h, None), PartitionSpec(b, None)

    def _key(self):
        return self.activations, self.table, self.cache, self.replicated

    def __eq__(self, other):  # equal constraints compile to the same program (sampling.generate takes it statically)
        return isinstance(other, ActivationConstraint) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())


def activation_constraint(mesh: Optional[Mesh], rules) -> Optional[ActivationConstraint]:
    """An ActivationConstraint for `mesh`, or None without a mesh (models then leave layouts to XLA)."""
    return None if mesh is None else ActivationConstraint(mesh, rules)


def batch_constraint(mesh: Optional[Mesh], rules) -> Callable[[dict], dict]:
    """batch dict -> the same arrays constrained to the batch sharding (leading axis over the "batch" rule), for use
    inside a jitted step after a gather or shuffle (e.g. jnp.take of a minibatch), which would otherwise leave the
    rows replicated and make every device compute the whole minibatch. Identity without a mesh."""
    if mesh is None:
        return lambda batch: batch

    def constrain(batch):
        return {k: jax.lax.with_sharding_constraint(v, NamedSharding(mesh, batch_spec(v.ndim, rules)))
                for k, v in batch.items()}
    return constrain


def shard_shape(shape: Sequence[int], sharding: NamedSharding) -> tuple[int, ...]:
    """The per-device shape of an array of global `shape` under `sharding`."""
    return tuple(sharding.shard_shape(tuple(shape)))


def _itemsize(leaf) -> int:
    """Bytes per element; a typed PRNG key counts its underlying key data (e.g. 2 x uint32 for threefry)."""
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct((), leaf.dtype))
        return math.prod(data.shape) * np.dtype(data.dtype).itemsize
    return np.dtype(leaf.dtype).itemsize


def per_device_bytes(abstract, shardings) -> int:
    """Bytes one device holds of a tree of arrays / ShapeDtypeStructs with matching shardings (None = replicated)."""
    total = 0
    for leaf, sh in zip(jax.tree.leaves(abstract), jax.tree.leaves(
            shardings, is_leaf=lambda x: isinstance(x, NamedSharding) or x is None)):
        shape = tuple(leaf.shape) if sh is None else shard_shape(leaf.shape, sh)
        total += math.prod(shape) * _itemsize(leaf)
    return int(total)

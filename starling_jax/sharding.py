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

import math
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


def initialize_distributed(config: MeshConfig) -> None:
    """Call jax.distributed.initialize() (coordinator, process count and id from the environment, as on Cloud TPU or
    SLURM) when the config asks for it. Must run before anything touches a device; calling it twice is harmless."""
    if config.distributed and not jax.distributed.is_initialized():
        jax.distributed.initialize()


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


def make_mesh(config: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types over `devices` (default: all devices of all processes)."""
    initialize_distributed(config)
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def data_shard(process_index: Optional[int] = None, process_count: Optional[int] = None) -> tuple[int, int]:
    """(shard index, shard count) for this process's share of the data: each host reads rows i with
    i % count == index and feeds them to its own devices (see put_batch)."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    return index, count


# ----------------------------------------------------------------------------------------------------------------------
# Logical axes -> PartitionSpec.


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
        if logical is None:
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


def put_batch(batch: Mapping[str, np.ndarray], shardings: Mapping[str, NamedSharding]) -> dict[str, jax.Array]:
    """Place this process's rows of a batch on the mesh as global arrays. On one host `batch` is the global batch; on
    several, each process passes its own share (see data_shard) and the global leading size is the sum over
    processes."""
    out = {}
    for k, local in batch.items():
        local = np.asarray(local)
        global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
        out[k] = jax.make_array_from_process_local_data(shardings[k], local, global_shape)
    return out


class ActivationConstraint:
    """Sharding constraints for a model's forward on a mesh. Called on x [B, T, D] it pins the residual stream to
    ACTIVATION_AXES (pass it as models.run_layers(constrain=...)): pinning at layer boundaries keeps XLA from choosing
    a layout that all-gathers the batch. `embedding(table)` pins the embedding table [V, D] to (vocab, -) for the
    lookup: gathered over fsdp like any FSDP weight, so the looked-up rows come out replicated over the batch axes and
    split locally, instead of sharded over D, which XLA can only re-split by replicating the whole activation."""

    def __init__(self, mesh: Mesh, rules):
        self.activations = NamedSharding(mesh, logical_to_spec(ACTIVATION_AXES, rules, mesh))
        self.table = NamedSharding(mesh, logical_to_spec(("vocab", None), rules, mesh))
        self.cache = NamedSharding(mesh, logical_to_spec((None, "batch", None, "kv_heads", None), rules, mesh))

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, self.activations)

    def embedding(self, table: jax.Array) -> jax.Array:
        return jax.lax.with_sharding_constraint(table, self.table)

    def kv_cache(self, kv: jax.Array) -> jax.Array:
        """A KV cache array [L, B, S, K, E] split over the batch axes and the kv heads (the kv_heads rule)."""
        return jax.lax.with_sharding_constraint(kv, self.cache)

    def _key(self):
        return self.activations, self.table, self.cache

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

"""Device mesh and logical-axis sharding rules.

Every model parameter carries logical axis names (`axes` metadata: "vocab", "embed", "heads",
"kv_heads", "head_dim", "mlp"; stacked layer params gain a leading "layers" axis). Rules map
each logical name to mesh axes ("data", "fsdp", "tensor"). A mesh axis that does not divide
the dimension it would shard is dropped for that parameter (it stays replicated along it),
so odd sizes such as a 259-token vocabulary never fail.

Typical use:

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = init_sharded(cfg, "lm", seed=0, mesh=mesh)       # no full copy on one device
    batch = jax.device_put(batch, batch_sharding(mesh))
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
DEFAULT_RULES: Tuple[Tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("length", None),
)

Rules = Union[Sequence[Tuple[str, Any]], Mapping[str, Any]]


def make_mesh(axes: Optional[Mapping[str, int]] = None, devices=None) -> Mesh:
    """A mesh over ("data", "fsdp", "tensor"). One axis size may be -1 (= the rest).

    `axes` defaults to all devices on "fsdp". Axes not named get size 1.
    """
    devices = list(devices if devices is not None else jax.devices())
    axes = dict(axes or {"fsdp": -1})
    unknown = set(axes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"Unknown mesh axes {sorted(unknown)}; valid axes are {MESH_AXES}.")
    sizes = {a: int(axes.get(a, 1)) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"At most one mesh axis may be -1, got {free}.")
    known = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot fill mesh {axes}.")
        sizes[free[0]] = len(devices) // known
    total = math.prod(sizes.values())
    if total > len(devices):
        raise ValueError(f"Mesh {sizes} needs {total} devices but {len(devices)} are available; "
                         "set one axis to -1 to absorb the rest.")
    if total < len(devices):
        if jax.process_count() > 1:
            raise ValueError(f"Mesh {sizes} uses {total} of {len(devices)} devices; in a "
                             "multi-process run the mesh must cover every device.")
        logging.warning("Mesh %s uses only %d of %d devices.", sizes, total, len(devices))
        devices = devices[:total]
    arr = np.asarray(devices, dtype=object).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(arr, MESH_AXES)


def _rules_dict(rules: Optional[Rules]) -> dict:
    rules = DEFAULT_RULES if rules is None else rules
    return dict(rules.items() if isinstance(rules, Mapping) else rules)


def logical_to_spec(axes: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
                    rules: Optional[Rules] = None) -> P:
    """PartitionSpec for an array with logical `axes`; drops non-dividing mesh axes."""
    rd = _rules_dict(rules)
    used = set()
    spec = []
    for name, dim in zip(axes, shape):
        target = rd.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        keep = []
        size = 1
        for t in targets:
            n = mesh.shape[t]
            if t in used or n == 1 or dim % (size * n):
                continue
            keep.append(t)
            size *= n
        used.update(keep)
        spec.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return P(*spec)


def param_axes(variable: nnx.Variable) -> Tuple[Optional[str], ...]:
    """Logical axes of a parameter; a stacked layer parameter gets a leading "layers"."""
    shape = variable.get_value().shape  # works for arrays and ShapeDtypeStructs
    axes = tuple(variable.get_metadata().get("axes", (None,) * len(shape)))
    if len(axes) == len(shape) - 1:
        axes = ("layers",) + axes
    if len(axes) != len(shape):
        raise ValueError(f"Parameter of shape {shape} has axes {axes} of wrong rank.")
    return axes


def state_shardings(state: nnx.State, mesh: Mesh, rules: Optional[Rules] = None):
    """A pytree like `state` (same structure) of NamedShardings for its arrays."""
    def one(v):
        if isinstance(v, nnx.Variable):
            spec = logical_to_spec(param_axes(v), v.get_value().shape, mesh, rules)
            return v.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, P())
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def model_shardings(model: nnx.Module, mesh: Mesh, rules: Optional[Rules] = None):
    """(graphdef, shardings of the model's state) for use as jit in/out shardings."""
    graphdef, state = nnx.split(model)
    return graphdef, state_shardings(state, mesh, rules)


def shard_model(model: nnx.Module, mesh: Mesh, rules: Optional[Rules] = None) -> nnx.Module:
    """Moves a model's state onto the mesh according to the rules (returns a new model)."""
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh, rules)
    state = jax.device_put(state, shardings)
    return nnx.merge(graphdef, state)


def init_sharded(cfg, head: str = "lm", seed: int = 0, mesh: Optional[Mesh] = None,
                 rules: Optional[Rules] = None) -> nnx.Module:
    """Random init directly into the sharded layout: `eval_shape`, then a jit whose
    `out_shardings` place each parameter; no full copy ever sits on one device."""
    from jaxrlhf.models.transformer import Transformer

    def create():
        return nnx.split(Transformer(cfg, head=head, rngs=nnx.Rngs(seed)))[1]

    abstract = jax.eval_shape(lambda: nnx.split(Transformer(cfg, head=head,
                                                            rngs=nnx.Rngs(seed))))
    graphdef, abstract_state = abstract
    if mesh is None:
        return nnx.merge(graphdef, jax.jit(create)())
    shardings = state_shardings(abstract_state, mesh, rules)
    state = jax.jit(create, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def batch_sharding(mesh: Mesh, rules: Optional[Rules] = None) -> NamedSharding:
    """Sharding of a batch's leading dimension over the "batch" rule (data, fsdp)."""
    rd = _rules_dict(rules)
    target = rd.get("batch", ("data", "fsdp"))
    axes = tuple(a for a in ((target,) if isinstance(target, str) else target)
                 if mesh.shape[a] > 1)
    return NamedSharding(mesh, P(axes if axes else None))


def shard_batch(batch, mesh: Mesh, rules: Optional[Rules] = None):
    """device_put a pytree of host arrays with the leading dim sharded over the batch axes."""
    return jax.device_put(batch, batch_sharding(mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def host_array(x) -> np.ndarray:
    """All of a global array on every host as NumPy (an all-gather when it spans processes)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

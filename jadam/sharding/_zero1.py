"""ZeRO-1: optimizer state split over the data-parallel mesh axis."""

from __future__ import annotations

from typing import Any, Hashable, Sequence

import jax
import optax

from jadam import _compat
from jadam._compat import Mesh, NamedSharding, PartitionSpec
from jadam.sharding import _placement

PyTree = Any


def _uses(entry: Any, axis: Hashable) -> bool:
  if entry is None or entry is PartitionSpec.UNCONSTRAINED:
    return False
  return axis == entry or (isinstance(entry, tuple) and axis in entry)


def add_axis(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh,
             axis: Hashable) -> PartitionSpec:
  """``spec`` with ``axis`` on the largest unsplit dimension it divides, if
  any. Split dimensions stay: on an ``Explicit`` mesh a ``"model"`` and a
  ``("model", "data")`` split of one dimension do not mix (a type error)."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  if any(_uses(e, axis) for e in entries):
    return PartitionSpec(*entries)
  n = mesh.shape[axis]
  free = [d for d in range(len(shape))
          if _placement.axis_size(mesh, entries[d]) == 1 and shape[d] % n == 0]
  if free:
    entries[max(free, key=lambda d: shape[d])] = axis  # first of the largest
  return PartitionSpec(*entries)


def zero1_shardings(tx: optax.GradientTransformation, params: PyTree,
                    axis: Hashable = "data") -> PyTree:
  """Shardings of ``tx.init(params)`` with the state split over ``axis``.

  Args:
    tx: the (unwrapped) optimizer.
    params: arrays or ``jax.ShapeDtypeStruct`` with a ``NamedSharding``.
    axis: the data-parallel mesh axis.

  Returns:
    A pytree like the state, of ``NamedSharding``, split as ``zero1`` does.

  Example:
    >>> import jax, jadam
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ("data",))
    >>> params = {"w": jax.ShapeDtypeStruct((8, 4), "float32",
    ...                                     sharding=NamedSharding(mesh, P()))}
    >>> shardings = jadam.sharding.zero1_shardings(jadam.adam(1e-3), params)
    >>> tuple(shardings[0].mu["w"].spec)
    ('data', None)
  """
  def widen(abstract):
    sharding = abstract.sharding
    if not isinstance(sharding, NamedSharding):
      raise ValueError(
          "zero1_shardings needs parameters with a NamedSharding on a mesh "
          f"that has axis {axis!r}; got {sharding!r}. Put the parameters on "
          "the mesh first, e.g. with jax.device_put(params, "
          "NamedSharding(mesh, PartitionSpec())).")
    return NamedSharding(sharding.mesh, add_axis(
        sharding.spec, abstract.shape, sharding.mesh, axis))
  return jax.tree.map(widen, _placement.abstract_state(tx, params))


def _check_axis(mesh: Mesh, axis: Hashable) -> None:
  if axis not in mesh.shape:
    raise ValueError(
        f"axis {axis!r} is not an axis of the mesh; its axes are "
        f"{tuple(mesh.shape)}.")


def zero1(tx: optax.GradientTransformation, mesh: Mesh,
          axis: Hashable = "data") -> optax.GradientTransformationExtraArgs:
  """ZeRO-1: ``tx`` with its state split over the data-parallel mesh axis.

  Each state array is split over ``axis`` on one dimension, so each of N
  devices keeps 1/N of it. Traced inside ``jit``, ``init`` fixes only that
  dimension (``out_shardings=zero1_shardings(...)`` fixes the rest); on
  ``Auto`` mesh axes give the step ``out_shardings`` for the parameters.

  Args:
    tx: any optax transformation, e.g. ``jadam.adam(1e-3)``.
    mesh: the device mesh.
    axis: name of its data-parallel axis.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with ``tx``'s state.

  Example:
    >>> import jax, jax.numpy as jnp, jadam
    >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
    >>> tx = jadam.sharding.zero1(jadam.adam(1e-3), mesh)
    >>> state = tx.init({"w": jnp.zeros((8, 4))})

  References:
    Rajbhandari, Rasley, Ruwase & He, "ZeRO: Memory Optimizations Toward
    Training Trillion Parameter Models", SC 2020.
  """
  _check_axis(mesh, axis)
  tx = optax.with_extra_args_support(tx)

  axis_is_explicit = _compat.is_explicit(
      mesh.axis_types[mesh.axis_names.index(axis)])

  def place(leaf):
    if not (isinstance(leaf, jax.Array) or _compat.is_tracer(leaf)):
      return leaf
    if _compat.is_tracer(leaf):
      placed = place_traced(leaf)
      # A state kept in host memory (``zero1(offload(...))``) stays there.
      return (_compat.transfer(placed, host=True)
              if _compat.in_host_memory(leaf) and leaf.ndim else placed)
    kind = leaf.sharding.memory_kind
    if leaf.ndim == 0:
      # Scalars (step counts) are replicated on the mesh, as jit returns them.
      return jax.device_put(leaf, NamedSharding(mesh, PartitionSpec(),
                                                memory_kind=kind))
    on_mesh = (isinstance(leaf.sharding, NamedSharding)
               and leaf.sharding.mesh == mesh)
    base = leaf.sharding.spec if on_mesh else PartitionSpec()
    return jax.device_put(leaf, _placement.as_returned(NamedSharding(
        mesh, add_axis(base, leaf.shape, mesh, axis), memory_kind=kind),
                                            leaf.ndim))

  def place_traced(leaf):
    if leaf.ndim == 0:
      return leaf
    typed = _compat.typeof(leaf).sharding
    if _placement.has_explicit_axes(typed) or axis_is_explicit:
      base = typed.spec if _placement.has_explicit_axes(typed) else PartitionSpec()
      return _compat.reshard(leaf, NamedSharding(
          mesh, add_axis(base, leaf.shape, mesh, axis)))
    # Auto axes under tracing: the other dimensions are the compiler's choice.
    base = PartitionSpec(*[PartitionSpec.UNCONSTRAINED] * leaf.ndim)
    return jax.lax.with_sharding_constraint(leaf, NamedSharding(
        mesh, add_axis(base, leaf.shape, mesh, axis)))

  def check_not_in_shard_map():
    if _compat.in_manual_axes():
      raise ValueError(
          "jadam.sharding.zero1 cannot run inside jax.shard_map: it splits the state "
          "with sharding annotations of the whole mesh, which a shard_map "
          "body (whose axes are manual) does not have. Initialise and step "
          "it outside shard_map, under jax.jit; inside shard_map, split the "
          "state yourself with in_specs/out_specs and use the optimizer "
          "without zero1.")

  def init_fn(params):
    check_not_in_shard_map()
    return jax.tree.map(place, tx.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    check_not_in_shard_map()
    new_updates, new_state = tx.update(updates, state, params, **extra_args)
    # ZeRO's all-gather: on Explicit axes, reshard updates like parameters.
    anchor = updates if params is None else params
    new_updates = jax.tree.map(
        _keep_sharding, new_updates, anchor)
    # The state keeps its split (on Auto axes, by the compiler's propagation).
    def keep(new, old):
      if (isinstance(old, jax.Array) and not _compat.is_tracer(old)
          and isinstance(new, jax.Array) and new.shape == old.shape):
        return jax.device_put(new, old.sharding)
      return _keep_sharding(new, old)
    return new_updates, jax.tree.map(keep, new_state, state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _keep_sharding(new: Any, old: Any) -> Any:
  """``new`` resharded like ``old`` where both have one shape and ``old``'s
  type carries a sharding (``Explicit`` axes); else ``new``."""
  if not ((isinstance(new, jax.Array) or _compat.is_tracer(new))
          and (isinstance(old, jax.Array) or _compat.is_tracer(old))
          and new.shape == old.shape and new.ndim > 0):
    return new
  typed = _compat.typeof(old).sharding
  if _placement.has_explicit_axes(typed):
    return _compat.reshard(new, typed)
  return new

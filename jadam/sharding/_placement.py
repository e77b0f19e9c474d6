"""Where optimizer state lives on a device mesh: its zeros follow their
parameter's sharding, and its placement is known without allocating it."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import optax
from jadam import _boxes
from jadam import _compat
from jadam._compat import Mesh, NamedSharding, PartitionSpec

Array = jax.Array
PyTree = Any


def scales_follow_rows(param_shape: Sequence[int], block: int,
                       pieces: Optional[int] = None) -> bool:
  """Whether a parameter's int8 block scales are split like its leading axis.

  They are when each piece of the split holds whole blocks (with ``pieces``
  unknown, when no block spans two rows); otherwise they are replicated.

  Args:
    param_shape: the parameter's shape.
    block: elements per block (``BlockwiseInt8.block_for(param_shape)``).
    pieces: how many pieces the leading axis is split into, if known.

  Returns:
    True if the scales follow the leading axis, False if replicated.
  """
  shape = tuple(int(d) for d in param_shape)
  if not shape or shape[0] == 0:
    return False
  if pieces is None:
    return math.prod(shape[1:]) % block == 0
  size = math.prod(shape)
  return shape[0] % pieces == 0 and (size // pieces) % block == 0


def zeros_placed_like(like: Any, shape: Sequence[int], dtype: Any, *,
                      block: Optional[int] = None) -> Array:
  """Zeros placed like ``like`` (an array, tracer or ``ShapeDtypeStruct``):
  with its sharding if of its shape, else as block scales of ``block``."""
  shape = tuple(int(d) for d in shape)
  if _compat.is_tracer(like):
    return _traced_zeros(like, shape, dtype, block)
  sharding = getattr(like, "sharding", None)
  if sharding is None or _compat.is_single_device_sharding(sharding):
    if sharding is not None and getattr(like, "committed", False):
      # Where the jitted step returns it, so the second step won't recompile.
      return jnp.zeros(shape, dtype, device=sharding)
    # Uncommitted parameters: keep jnp's default placement, as optax does.
    return jnp.zeros(shape, dtype)
  if shape != tuple(like.shape):
    if not isinstance(sharding, NamedSharding):
      return jnp.zeros(shape, dtype)
    sharding = _leading_split(sharding, tuple(like.shape), block)
  return jnp.zeros(shape, dtype, device=as_returned(sharding, len(shape)))


def as_returned(sharding: Any, ndim: int) -> Any:
  """``sharding`` spelled as a jitted step returns it (``Auto``: ``P()``, not
  ``P(None)``; ``Explicit``: ``P(None, None)``), so steps compile once."""
  if not isinstance(sharding, NamedSharding):
    return sharding
  spec = tuple(sharding.spec)
  if has_explicit_axes(sharding):
    spec += (None,) * (ndim - len(spec))
  else:
    while spec and spec[-1] is None:
      spec = spec[:-1]
  if spec == tuple(sharding.spec):
    return sharding
  return NamedSharding(sharding.mesh, PartitionSpec(*spec),
                       memory_kind=sharding.memory_kind)


def _scalar_placement(params: PyTree) -> Any:
  """Replicated on the mesh or device of the first committed leaf, or None."""
  for leaf in jax.tree.leaves(params):
    if (_compat.is_tracer(leaf) or not isinstance(leaf, jax.Array)
        or not leaf.committed):
      continue
    sharding = leaf.sharding
    if isinstance(sharding, NamedSharding):
      return NamedSharding(sharding.mesh, PartitionSpec())
    if _compat.is_single_device_sharding(sharding):
      return _compat.with_memory_kind(sharding, "device")
  return None


def place_scalars(state: PyTree, params: PyTree) -> PyTree:
  """Place an eager init's loose scalars where a jitted step returns them.

  Uncommitted scalars make the second step compile again when the parameters
  are committed. Every jadam ``init`` does this; use it for optax's state.

  Args:
    state: an optimizer state, from ``tx.init(params)`` called eagerly.
    params: the parameters it was initialised from.

  Returns:
    ``state`` with its uncommitted scalars placed.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jadam
    >>> params = jax.device_put({"w": jnp.zeros(4)}, jax.devices()[0])
    >>> tx = optax.MultiSteps(jadam.adam(1e-3), every_k_schedule=2)
    >>> state = jadam.sharding.place_scalars(tx.init(params), params)
    >>> state.mini_step.committed
    True
  """
  # Uncommitted parameters may meet committed (offloaded) state: the step's
  # outputs are then committed, and so must the scalars be.
  sharding = _scalar_placement(params) or _scalar_placement(state)
  if sharding is None:
    return state

  def place(leaf):
    if not isinstance(leaf, jax.Array) or _compat.is_tracer(leaf):
      return leaf
    if leaf.ndim == 0 and not leaf.committed:
      return jax.device_put(leaf, sharding)
    # optax's arrays (MultiSteps's accumulator) need respelling too.
    spelled = as_returned(leaf.sharding, leaf.ndim)
    return leaf if spelled is leaf.sharding else jax.device_put(leaf, spelled)
  return jax.tree.map(place, state)


def placing_scalars(tx: optax.GradientTransformation
                    ) -> optax.GradientTransformation:
  """``tx`` whose ``init`` ends with ``place_scalars``, for optimizers whose
  scalars optax's code makes (schedule-free averaging weights)."""
  inner_init = tx.init

  def init_fn(params):
    return place_scalars(inner_init(params), params)
  return tx._replace(init=init_fn)


def _leading_split(sharding: NamedSharding, param_shape: tuple[int, ...],
                   block: Optional[int]) -> NamedSharding:
  """Block scales' sharding: the parameter's leading axis where
  ``scales_follow_rows`` allows, else replicated."""
  lead = sharding.spec[0] if param_shape and len(sharding.spec) else None
  if block is None or not scales_follow_rows(
      param_shape, block, axis_size(sharding.mesh, lead)):
    lead = None
  return NamedSharding(sharding.mesh, PartitionSpec(lead))


def _traced_zeros(like: Array, shape: tuple[int, ...], dtype: Any,
                  block: Optional[int]) -> Array:
  """Zeros under tracing placed like (a view of) ``like``: copied from its
  type on ``Explicit`` axes, computed from it on ``Auto`` axes."""
  if shape == tuple(like.shape):
    # Elementwise from the parameter: also keeps shard_map's varying axes.
    return zeros_tied_to(like, dtype)
  if not shape or math.prod(shape) == 0 or like.size == 0:
    return jnp.zeros(shape, dtype)
  typed = _compat.typeof(like).sharding
  if has_explicit_axes(typed):
    # reshard, not ``full(..., sharding=)``: JAX 0.12 drops that argument
    # under jit on an abstract mesh.
    zeros = _compat.reshard(jnp.zeros(shape, dtype),
                            _leading_split(typed, tuple(like.shape), block))
    # The barrier uses ``like``, so jit takes its devices from the parameter
    # even when no other output reads it.
    return jax.lax.optimization_barrier((zeros, like))[0]
  # An anchor of ``shape`` carrying the parameter's leading split: the
  # flattened parameter as shape[0] consecutive pieces, broadcast.
  pieces = shape[0]
  per_piece = -(-like.size // pieces)
  flat = jnp.pad(jnp.ravel(like), (0, pieces * per_piece - like.size))
  first_of_piece = flat.reshape(pieces, per_piece)[:, :1]
  anchor = jnp.broadcast_to(
      first_of_piece, (pieces, max(1, math.prod(shape[1:])))).reshape(shape)
  return zeros_tied_to(anchor, dtype)


def zeros_tied_to(like: Array, dtype: Any) -> Array:
  """Exact zeros computed from ``like``, so that on ``Auto`` axes sharding
  propagation places them like ``like`` (a constant may go anywhere). A
  logical right shift by the full bit width is 0 for every input, NaN
  included, and XLA does not fold it away."""
  if jnp.issubdtype(like.dtype, jnp.complexfloating):
    like = jnp.real(like)
  if jnp.issubdtype(like.dtype, jnp.bool_):
    like = like.astype(jnp.uint8)
  width = jnp.dtype(like.dtype).itemsize * 8
  word = jax.lax.bitcast_convert_type(like, jnp.dtype(f"uint{width}"))
  zeros = jax.lax.shift_right_logical(word, jnp.asarray(width, word.dtype))
  return zeros.astype(dtype)


def has_explicit_axes(sharding: Any) -> bool:
  mesh = getattr(sharding, "mesh", None)
  return mesh is not None and not mesh.empty and any(
      _compat.is_explicit(t) for t in mesh.axis_types)


def explicit_shardings(tree: Any) -> Optional[Any]:
  """Shardings of ``tree``'s arrays if any is on a mesh with Explicit axes,
  else None; an array on no mesh counts as replicated on that mesh."""
  leaves, treedef = jax.tree.flatten(tree)
  shardings = [_compat.typeof(x).sharding for x in leaves]
  for sharding in shardings:
    if has_explicit_axes(sharding):
      return treedef.unflatten([
          NamedSharding(sharding.mesh, PartitionSpec())
          if getattr(s, "mesh", None) is None or s.mesh.empty else s
          for s in shardings])
  return None


def axis_size(mesh: Mesh, axes: Any) -> int:
  if axes is None or axes is PartitionSpec.UNCONSTRAINED:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def abstract_state(tx: optax.GradientTransformation,
                   params: PyTree) -> PyTree:
  """Shapes, dtypes and shardings of ``tx.init(params)``, nothing allocated.

  Args:
    tx: any optax transformation.
    params: arrays, or ``jax.ShapeDtypeStruct`` with a ``sharding``.

  Returns:
    A pytree like the state, of ``jax.ShapeDtypeStruct`` with ``sharding``.

  Example:
    >>> import jax, jax.numpy as jnp, jadam
    >>> params = {"w": jax.ShapeDtypeStruct((1024, 1024), jnp.float32)}
    >>> state = jadam.sharding.abstract_state(jadam.adam(1e-3), params)
    >>> state[0].mu["w"].shape
    (1024, 1024)
  """
  shapes = jax.eval_shape(tx.init, params)
  shardings = jax.jit(tx.init).lower(params).compile().output_shardings
  # As a step returns them, so a state restored onto them does not recompile.
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(
          s.shape, s.dtype, sharding=as_returned(sh, len(s.shape))),
      shapes, shardings)


def state_shardings(tx: optax.GradientTransformation,
                    params: PyTree) -> PyTree:
  """The sharding of every leaf of ``tx.init(params)`` (``out_shardings``).

  Args:
    tx: any optax transformation.
    params: arrays or ``jax.ShapeDtypeStruct`` carrying shardings.

  Returns:
    A pytree like the state, of ``jax.sharding.Sharding``.

  Example:
    >>> import jax, jax.numpy as jnp, jadam
    >>> tx, params = jadam.adam(1e-3), {"w": jnp.ones(4)}
    >>> shardings = jadam.sharding.state_shardings(tx, params)
  """
  return jax.tree.map(lambda s: s.sharding, abstract_state(tx, params))


def state_specs(tx: optax.GradientTransformation, params: PyTree,
                param_specs: PyTree) -> PyTree:
  """Partition specs of ``tx.init(params)`` from the parameters' specs.

  Nothing is compiled or allocated; mesh axis names or Flax logical names
  pass through. int8 block scales follow ``scales_follow_rows``.

  Args:
    tx: the optimizer.
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``s).
    param_specs: a tree like ``params`` of ``PartitionSpec`` or None.

  Returns:
    A tree like ``tx.init(params)`` of ``PartitionSpec``.

  Example:
    >>> import jax, jadam
    >>> from jax.sharding import PartitionSpec as P
    >>> params = {"w": jax.ShapeDtypeStruct((1024, 256), "float32")}
    >>> specs = jadam.sharding.state_specs(
    ...     jadam.adam(1e-3, nu_dtype="int8"), params, {"w": P("data", None)})
    >>> [tuple(spec) for spec in specs[0].nu["w"]]  # codes, scales
    [('data', None), ('data',)]
  """
  # AxisNames is jadam's own box, followed through init as Flax's are.
  def named(param, spec):
    names = tuple(spec) if spec is not None else ()
    return _boxes.AxisNames(param, names + (None,) * (
        len(param.shape) - len(names)))
  boxed = jax.tree.map(named, params, param_specs,
                       is_leaf=lambda x: x is None)
  abstract = jax.eval_shape(tx.init, boxed)

  def spec(x):
    if isinstance(x, _boxes.AxisNames):
      return PartitionSpec(*x.names)
    return PartitionSpec()
  return jax.tree.map(spec, abstract,
                      is_leaf=lambda x: isinstance(x, _boxes.AxisNames))


def bytes_per_device(tree: PyTree) -> dict[Any, int]:
  """Bytes each device holds of the arrays in ``tree`` (addressable shards).

  Args:
    tree: a pytree of ``jax.Array`` (non-array leaves are ignored).

  Returns:
    ``{device: bytes}`` over the devices of this process.

  Example:
    >>> import jax.numpy as jnp, jadam
    >>> list(jadam.sharding.bytes_per_device({"w": jnp.zeros(4)}).values())
    [16]
  """
  totals: dict[Any, int] = {}
  for leaf in jax.tree.leaves(tree):
    if not isinstance(leaf, jax.Array):
      continue
    for shard in leaf.addressable_shards:
      totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
  return totals

"""Where optimizer state lives on a device mesh.

The Adam rule is elementwise, so a moment can be split over devices in any way
its parameter can, and nothing in jadam needs to know the mesh. This module
only decides *placement*:

* State follows its parameter. Every zero of optimizer state is made by
  :mod:`jadam._formats`, which calls :func:`zeros_placed_like` here.
  Plain ``jnp.zeros`` under ``jax.jit`` has no data dependence on the
  parameter, so the compiler is free to put it anywhere (in practice whole on
  one device). On ``Explicit`` mesh axes the zeros copy the sharding in the
  parameter's type; on ``Auto`` axes they are computed *from* the parameter
  (:func:`zeros_tied_to`), an elementwise chain the compiler's sharding
  propagation follows, so they get the parameter's sharding on a data, model
  or mixed mesh alike. Only public JAX is used, the same on every supported
  release (earlier versions used ``jax.experimental.shard_alike``, which JAX
  0.11 removed).
* :func:`abstract_state` / :func:`state_shardings`: the shapes and shardings
  of ``tx.init(params)`` without allocating it (for ``out_shardings`` or for
  restoring a checkpoint onto a mesh).
* ZeRO-1 is :mod:`jadam.sharding._zero1`, host offload
  :mod:`jadam.sharding._offload`.
* :func:`bytes_per_device`: what a pytree of arrays occupies on each device.
"""

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


# ---------------------------------------------------------------------------
# State follows its parameter.


def scales_follow_rows(param_shape: Sequence[int], block: int,
                       pieces: Optional[int] = None) -> bool:
  """The placement rule of int8 block scales: whether the scale vector of a
  parameter is split like the parameter's leading axis.

  A parameter's blocks are runs of ``block`` consecutive elements of its
  flattened array, so its scale vector can be split like its leading axis
  exactly when every piece of that split holds whole blocks; otherwise it
  is replicated (scales are 4 bytes per block: 1/64 of the codes with
  blocks of 256). Without a mesh (logical axis names, ``state_specs``) the
  number of pieces is unknown, and the scales follow the leading axis when
  no block spans two of its rows, which makes every even split hold whole
  blocks.

  Args:
    param_shape: the parameter's shape.
    block: elements per block (``BlockwiseInt8.block_for(param_shape)``).
    pieces: how many pieces the leading axis is split into, if known.
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
  """Zeros of ``shape`` and ``dtype`` placed on the devices of ``like``.

  If ``shape`` is ``like``'s shape the zeros get exactly ``like``'s sharding.
  Otherwise they are the block scales of a quantized moment, one per
  ``block`` consecutive elements of the flattened parameter, split like the
  parameter's leading axis where :func:`scales_follow_rows` says so and
  replicated otherwise.

  Args:
    like: the parameter: a ``jax.Array``, a tracer inside ``jax.jit`` or
      ``shard_map``, a ``jax.ShapeDtypeStruct`` (its ``sharding`` is used if
      set), or anything with ``shape`` and ``dtype``.
    shape: shape of the zeros.
    dtype: dtype of the zeros.
    block: for block scales, the elements per block.

  Returns:
    A ``jax.Array`` of zeros.
  """
  shape = tuple(int(d) for d in shape)
  if _compat.is_tracer(like):
    return _traced_zeros(like, shape, dtype, block)
  sharding = getattr(like, "sharding", None)
  if sharding is None or _compat.is_single_device_sharding(sharding):
    if sharding is not None and getattr(like, "committed", False):
      # Committed to one device: the jitted step returns the state there,
      # so it starts there (uncommitted, the step's second call would see
      # another signature and compile again, as with optax's init).
      return jnp.zeros(shape, dtype, device=sharding)
    # Uncommitted parameters: keep jnp's default placement, as optax does.
    return jnp.zeros(shape, dtype)
  if shape != tuple(like.shape):
    if not isinstance(sharding, NamedSharding):
      return jnp.zeros(shape, dtype)
    sharding = _leading_split(sharding, tuple(like.shape), block)
  return jnp.zeros(shape, dtype, device=as_returned(sharding, len(shape)))


def as_returned(sharding: Any, ndim: int) -> Any:
  """``sharding`` spelled as a jitted step returns it, so that a state made
  with it and the state a step returns are one signature and the second
  step does not compile again: on ``Auto`` mesh axes trailing unsplit
  dimensions are dropped (``P()``, not ``P(None)``), on ``Explicit`` axes
  every dimension is spelled (``P(None, None)``, as in the array's type).
  Other shardings come back unchanged."""
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
  """Replicated on the mesh or the one device of the first committed
  parameter; None if no parameter is committed (see :func:`place_scalars`)."""
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
  """Put an eagerly initialised state's loose scalars where a jitted step
  returns them, so that the step compiles once.

  A jitted step returns its outputs committed to the devices it ran on. A
  state whose scalars (step counts, skip counters, hyperparameters) were made
  uncommitted is a different signature from the one the first step returns,
  so the second step compiles again, even on one device, whenever the
  parameters are committed (on a mesh, or ``device_put`` on one device).
  Every jadam ``init`` already ends with this call; use it for state that
  optax's wrappers make, such as ``optax.MultiSteps`` and
  ``optax.inject_hyperparams``, or ``optax.adam`` itself.

  Uncommitted scalars go replicated on the parameters' mesh, or on their
  one device; nothing changes under tracing (the compiler places them) or
  when the parameters are uncommitted (plain ``jnp`` arrays, where the
  step's outputs are uncommitted too).

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
  # Parameters on no particular device may still meet state committed to
  # one (kept in host memory by jadam.sharding.offload): the step's outputs are then
  # committed, and so must the scalars be.
  sharding = _scalar_placement(params) or _scalar_placement(state)
  if sharding is None:
    return state

  def place(leaf):
    if not isinstance(leaf, jax.Array) or _compat.is_tracer(leaf):
      return leaf
    if leaf.ndim == 0 and not leaf.committed:
      return jax.device_put(leaf, sharding)
    # Arrays made by optax's wrappers (MultiSteps's accumulated gradients)
    # copy the parameters' sharding as spelled; a step returns it spelled
    # its own way.
    spelled = as_returned(leaf.sharding, leaf.ndim)
    return leaf if spelled is leaf.sharding else jax.device_put(leaf, spelled)
  return jax.tree.map(place, state)


def placing_scalars(tx: optax.GradientTransformation
                    ) -> optax.GradientTransformation:
  """``tx`` (of the same type) whose ``init`` ends with :func:`place_scalars`:
  for optimizers whose scalars optax's code makes (a schedule's step count,
  schedule-free averaging weights)."""
  inner_init = tx.init

  def init_fn(params):
    return place_scalars(inner_init(params), params)
  return tx._replace(init=init_fn)


def _leading_split(sharding: NamedSharding, param_shape: tuple[int, ...],
                   block: Optional[int]) -> NamedSharding:
  """Block scales of a parameter sharded by ``sharding``: split like its
  leading axis where :func:`scales_follow_rows`, else replicated."""
  lead = sharding.spec[0] if param_shape and len(sharding.spec) else None
  if block is None or not scales_follow_rows(
      param_shape, block, axis_size(sharding.mesh, lead)):
    lead = None
  return NamedSharding(sharding.mesh, PartitionSpec(lead))


def _traced_zeros(like: Array, shape: tuple[int, ...], dtype: Any,
                  block: Optional[int]) -> Array:
  """Zeros under tracing, placed like (a view of) ``like``.

  On a mesh with ``Explicit`` axes the sharding is part of ``like``'s type
  and is copied; on ``Auto`` axes it is only decided by the compiler, and
  computing the zeros from ``like`` (:func:`zeros_tied_to`) makes its sharding
  propagation give them whatever it decides for ``like``.
  """
  if shape == tuple(like.shape):
    # Elementwise from the parameter: copies an Explicit sharding in the
    # type, follows an Auto one in the compiler, and keeps shard_map's
    # varying axes.
    return zeros_tied_to(like, dtype)
  if not shape or math.prod(shape) == 0 or like.size == 0:
    return jnp.zeros(shape, dtype)
  typed = _compat.typeof(like).sharding
  if has_explicit_axes(typed):
    # reshard, not ``full(..., sharding=)``: JAX 0.12 drops that argument
    # under jit on an abstract mesh.
    zeros = _compat.reshard(jnp.zeros(shape, dtype),
                            _leading_split(typed, tuple(like.shape), block))
    # The barrier makes the computation use ``like``, so that jit takes its
    # devices from the parameter even when no other output reads it.
    return jax.lax.optimization_barrier((zeros, like))[0]
  # View the flattened parameter as shape[0] consecutive pieces, broadcast to
  # ``shape``: an anchor carrying the parameter's split of the leading
  # dimension, from which the zeros are computed.
  pieces = shape[0]
  per_piece = -(-like.size // pieces)
  flat = jnp.pad(jnp.ravel(like), (0, pieces * per_piece - like.size))
  first_of_piece = flat.reshape(pieces, per_piece)[:, :1]
  anchor = jnp.broadcast_to(
      first_of_piece, (pieces, max(1, math.prod(shape[1:])))).reshape(shape)
  return zeros_tied_to(anchor, dtype)


def zeros_tied_to(like: Array, dtype: Any) -> Array:
  """Exact zeros of ``like``'s shape, computed from ``like`` elementwise.

  A plain constant has no operand, so on ``Auto`` mesh axes the compiler may
  place it anywhere. These zeros are a logical right shift of ``like``'s bit
  pattern by its full width, which XLA defines as 0 for every input (NaN and
  infinities included) and which its simplifier leaves in place, so sharding
  propagation gives them ``like``'s sharding. The cost is one read of
  ``like`` when the state is created. ``tests/test_sharding.py`` checks the
  placement on every supported JAX.

  Args:
    like: an array or tracer of any numeric or boolean dtype.
    dtype: dtype of the zeros.

  Returns:
    Zeros of ``like.shape`` and ``dtype``.
  """
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
  """The shardings of ``tree``'s arrays if any is on a mesh with Explicit
  axes (the default of ``jax.make_mesh``), else None. An array on no mesh
  (a gradient made outside it, say) meets the mesh's arrays as a
  replicated one, as it does in any jnp operation."""
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
    tx: any optax transformation (jadam's place their state like the
      parameters; others' state is placed wherever the compiler puts it).
    params: the parameters, as arrays or as ``jax.ShapeDtypeStruct`` with a
      ``sharding``.

  Returns:
    A pytree like the state, of ``jax.ShapeDtypeStruct`` with ``sharding`` set.

  Example:
    >>> import jax, jax.numpy as jnp, jadam
    >>> params = {"w": jax.ShapeDtypeStruct((1024, 1024), jnp.float32)}
    >>> state = jadam.sharding.abstract_state(jadam.adam(1e-3), params)
    >>> state[0].mu["w"].shape
    (1024, 1024)
  """
  shapes = jax.eval_shape(tx.init, params)
  shardings = jax.jit(tx.init).lower(params).compile().output_shardings
  # Spelled as a step returns them, so that a state restored onto these
  # shardings continues without compiling the step again.
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(
          s.shape, s.dtype, sharding=as_returned(sh, len(s.shape))),
      shapes, shardings)


def state_shardings(tx: optax.GradientTransformation,
                    params: PyTree) -> PyTree:
  """The sharding of every leaf of ``tx.init(params)``.

  Use it as ``out_shardings`` of a jitted init or train step, or to restore a
  checkpoint directly onto the mesh.

  Args:
    tx: any optax transformation.
    params: arrays or ``jax.ShapeDtypeStruct`` carrying shardings.

  Returns:
    A pytree like the state, of ``jax.sharding.Sharding``.

  Example:
    >>> import jax, jax.numpy as jnp, jadam
    >>> shardings = jadam.sharding.state_shardings(jadam.adam(1e-3), {"w": jnp.ones(4)})
  """
  return jax.tree.map(lambda s: s.sharding, abstract_state(tx, params))


def state_specs(tx: optax.GradientTransformation, params: PyTree,
                param_specs: PyTree) -> PyTree:
  """The ``PartitionSpec`` of every leaf of ``tx.init(params)``, from the
  parameters' specs, without compiling or allocating anything.

  Each state array of a parameter's shape (a moment, int8 codes) gets the
  parameter's spec; int8 block scales get the parameter's leading axis name
  where no block spans two of its rows, else ``P(None)`` (replicated; see
  :func:`scales_follow_rows`); everything else (step counts, optax's own
  scalars) gets ``P()``. The names are carried through ``tx.init`` as they
  are, so they may be mesh axis names or Linen logical names (convert the
  result with ``flax.linen.logical_to_mesh_sharding``).

  The moment specs are what ``optax.tree_map_params`` gives; unlike it,
  this also places the int8 block scales of every jadam optimizer, alone
  or inside any optax chain or wrapper.

  Args:
    tx: the optimizer.
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``s).
    param_specs: a tree like ``params`` of ``PartitionSpec`` (or tuples of
      axis names, or None for replicated).

  Returns:
    A tree like ``tx.init(params)`` of ``PartitionSpec``.

  Example:
    >>> import jax, jadam
    >>> from jax.sharding import PartitionSpec as P
    >>> params = {"w": jax.ShapeDtypeStruct((1024, 256), "float32")}
    >>> specs = jadam.sharding.state_specs(
    ...     jadam.adam(1e-3, nu_dtype="int8"), params, {"w": P("data", None)})
    >>> specs[0].nu["w"], specs[0].scales.nu["w"]
    (PartitionSpec('data', None), PartitionSpec('data',))
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


# ---------------------------------------------------------------------------
# Measuring.


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

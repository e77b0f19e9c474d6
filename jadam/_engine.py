"""The one engine: ``init`` and ``update`` of every optimizer of the package.

An optimizer is a per-array step (:class:`jadam._rule.LeafRule`) and a
declaration of its moments (:class:`Moment`: which fields of its state, which
are second moments); :func:`transformation` builds the optax transformation
around them. The engine owns everything that is not the arithmetic: storage
formats (:mod:`jadam._formats`), the skip decision (:mod:`jadam._skip`), the
tree walk and its checks, the random streams of stochastic rounding, and the
CPU single-pass form (:mod:`jadam._fusion`).

States are optax's own classes whatever the storage: an int8 moment is a
leaf (:class:`jadam.Int8Moment`) inside them, never a class of its own.
State that is not a moment (skip counters, telemetry, hyperparameters) lives
in wrapper elements of the chain, not in these states.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from jadam import _boxes
from jadam import _compat
from jadam import _formats
from jadam import _fusion
from jadam import _rounding
from jadam import _rule
from jadam.sharding import _placement
from jadam import _skip
from jadam import _validation
from jadam._formats import floats
from jadam._formats import int8

Array = jax.Array


class Moment(NamedTuple):
  """One moment an optimizer keeps per parameter.

  Attributes:
    field: its field in the optimizer's state class.
    second: a moment of |g|² (real for complex parameters; float16 and int8
      keep √v).
    monotone: a running maximum that rounding must not lower (AMSGrad's).
  """

  field: str
  second: bool = False
  monotone: bool = False


# Each state class the engine makes, and the moments it holds: what
# ``decode_moments``, ``describe``, telemetry and conversion read.
_DECLARED: dict[type, tuple[Moment, ...]] = {}


def declare(state_class: type, moments: tuple[Moment, ...]) -> None:
  """Record that ``state_class`` holds ``moments`` (at import time)."""
  known = _DECLARED.setdefault(state_class, moments)
  if {m.field: m.second for m in known} != {m.field: m.second
                                             for m in moments}:
    raise ValueError(f"{state_class.__name__} declared with moments "
                     f"{known} and {moments}.")


def moments_of(state: Any) -> Optional[tuple[Moment, ...]]:
  """The moments a state of the engine holds, or None for other nodes."""
  return _DECLARED.get(type(state))


def transformation(
    state_class: type, moments: tuple[Moment, ...], formats: tuple,
    rule: Callable[[Any, Array, Optional[Array]], _rule.LeafRule], *,
    counters: Optional[dict[str, Callable[[Any, Optional[Array]], Array]]]
    = None,
) -> optax.GradientTransformationExtraArgs:
  """An optax transformation stepping ``moments`` with a per-array rule.

  Args:
    state_class: the state's class (optax's own): fields ``count``, the
      moments' fields and ``counters``'.
    moments: the moments, in the order ``rule``'s step takes them.
    formats: per moment, its storage format (:func:`jadam._formats.as_format`).
    rule: ``rule(state, t, skip)``: this call's
      :class:`jadam._rule.LeafRule` (``t`` the new step number, ``skip`` the
      skip decision or None).
    counters: other int32 counters of the state: field name to
      ``update(state, skip)`` giving its new value (zero at init).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the
    extra argument ``jadam_skip`` (:mod:`jadam._skip`) and ignores others.
  """
  declare(state_class, moments)
  counters = counters or {}

  def init_fn(params):
    trees = init_moments(params, moments, formats)
    # A zero of its own per counter: one buffer in two places cannot be
    # donated to a jitted step.
    zero = lambda: jnp.zeros([], jnp.int32)
    return _placement.place_scalars(state_class(
        count=zero(), **{name: zero() for name in counters},
        **{m.field: tree for m, tree in zip(moments, trees)}), params)

  def update_fn(updates, state, params=None, **extra_args):
    decision, skip, t = _skip.read(extra_args, state.count)
    out, trees = walk(rule(state, t, skip), updates, t,
                      [getattr(state, m.field) for m in moments], formats,
                      moments, params)
    new_state = state._replace(
        count=t, **{name: fn(state, skip) for name, fn in counters.items()},
        **{m.field: tree for m, tree in zip(moments, trees)})
    _skip.record(decision, state, new_state)
    return out, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _as_array(param: Any) -> Any:
  """A Python or NumPy scalar leaf as an array (optax accepts them too)."""
  return param if hasattr(param, "dtype") else jnp.asarray(param)


def init_moments(params: Any, moments: Sequence[Moment],
                 formats: Sequence[Any]) -> list[Any]:
  """Zero moments of ``params``, one tree per moment, each leaf in its
  format's layout and in its parameter's Flax box (block scales in a box of
  their own, :mod:`jadam._boxes`)."""
  def one(entry, fmt, moment):
    if entry is None:
      return None
    param = _as_array(_boxes.open_box(entry))
    leaf = fmt.for_leaf(tuple(param.shape), param.dtype,
                        second=moment.second)
    return leaf.boxed(entry, leaf.zeros(param))
  is_entry = lambda x: x is None or _boxes.is_box(x)
  return [jax.tree.map(lambda e, f=f, m=m: one(e, f, m), params,
                       is_leaf=is_entry)
          for f, m in zip(formats, moments)]


def walk(leaf: _rule.LeafRule, updates: Any, t: Array,
         stored_trees: Sequence[Any], formats: Sequence[Any],
         moments: Sequence[Moment], params: Any = None
         ) -> tuple[Any, list[Any]]:
  """The one tree walk of the package: check the gradients and the state,
  and step each leaf's moments (:func:`step_leaf`).

  Args:
    leaf: the optimizer's step on one array.
    updates: the gradients.
    t: the step number (int32, from 1); it seeds stochastic rounding.
    stored_trees: one tree per moment, in ``leaf``'s order.
    formats: per moment, its storage format.
    moments: per moment, its declaration.
    params: the parameters, if ``update`` was given them.

  Returns:
    ``(directions, new_stored_trees)``; where the step is skipped, every
    stored moment comes back bitwise as it was.
  """
  plain = _boxes.strip(updates)
  plain_trees = [_boxes.strip(tree) for tree in stored_trees]
  _validation.check_same_tree(plain, plain_trees[0], what="optimizer state",
                              is_leaf=_formats.is_moment_leaf)
  _validation.check_float_leaves(plain)
  grads, treedef = jax.tree.flatten(plain)
  if not grads:
    return updates, list(stored_trees)
  columns = [treedef.flatten_up_to(tree) for tree in plain_trees]
  _validation.check_moment_kinds(
      plain, grads, [[x.codes if _formats.is_moment_leaf(x) else x
                      for x in column] for column in columns],
      [m.second for m in moments])
  param_leaves = _param_leaves(treedef, params)
  if param_leaves is not None:
    _validation.check_parameter_kinds(plain, param_leaves)
  leaf_formats = [
      _check_stored(plain, index, g, param_leaves, formats, moments,
                    [column[index] for column in columns])
      for index, g in enumerate(grads)]
  tracing = any(_compat.is_tracer(g) for g in grads)
  positions = _positions(len(grads), t) if tracing else range(len(grads))
  step = _shared_leaf_step(leaf, tracing)
  rows = []
  for index, (g, position) in enumerate(zip(grads, positions)):
    entries = [column[index] for column in columns]
    stored = tuple(x.codes if isinstance(x, int8.Int8Moment) else x
                   for x in entries)
    scales = tuple(x.scales if isinstance(x, int8.Int8Moment) else None
                   for x in entries)
    direction, values, new_scales = step(g, stored, t, scales, position,
                                         leaf_formats[index])
    if leaf.skip is not None and any(s is not None for s in scales):
      # Re-encoding unchanged int8 moments need not give the same codes.
      values = tuple(_rule.hold(leaf.skip, v, x)
                     for v, x in zip(values, stored))
      new_scales = tuple(_rule.hold(leaf.skip, s, x)
                         for s, x in zip(new_scales, scales))
    rows.append((direction, tuple(
        v if s is None else int8.Int8Moment(v, s)
        for v, s in zip(values, new_scales))))
  directions = _boxes.restore(updates, treedef.unflatten(
      [row[0] for row in rows]))
  return directions, [
      _boxes.restore(old, treedef.unflatten([row[1][k] for row in rows]))
      for k, old in enumerate(stored_trees)]


def _param_leaves(treedef: Any, params: Any) -> Optional[list[Any]]:
  """The parameters' leaves in the gradients' order, or None."""
  if params is None:
    return None
  try:
    return [_as_array(p) for p in treedef.flatten_up_to(_boxes.strip(params))]
  except (ValueError, TypeError):
    return None  # not the gradients' structure: the checks say so elsewhere


def _check_stored(updates: Any, index: int, g: Array,
                  param_leaves: Optional[list[Any]], formats: Sequence[Any],
                  moments: Sequence[Moment], stored: list[Any]) -> tuple:
  """Each moment's leaf format for gradient leaf ``index``, after checking
  that the state holds each moment in it.

  A format that follows the parameter (``mu_dtype=None``) is resolved from
  the parameter's dtype when ``update`` is given the parameters, else from
  the stored moment itself.

  Raises:
    ValueError: naming the key path, the format found and the format
      configured, for a state made by a differently configured optimizer.
  """
  out = []
  for fmt, moment, x in zip(formats, moments, stored):
    if param_leaves is not None:
      leaf = fmt.for_leaf(tuple(g.shape), param_leaves[index].dtype,
                          second=moment.second)
    elif (isinstance(fmt, floats.Float) and fmt.dtype is None
          and not isinstance(x, int8.Int8Moment)):
      # The parameter's dtype, as init recorded it in the stored moment.
      leaf = _formats.found(x, tuple(g.shape), second=moment.second)
    else:
      leaf = fmt.for_leaf(tuple(g.shape), g.dtype, second=moment.second)
    if not leaf.matches(x):
      path = _compat.keystr(_compat.flatten_with_path(updates)[0][index][0])
      was = _formats.found(x, tuple(g.shape), second=moment.second)
      raise ValueError(
          f"The optimizer state's {moment.field} at {path or '<root>'} is "
          f"stored as {was}, but this optimizer stores it as {leaf} "
          f"({moment.field}'s format: {fmt}). The state was made by an "
          "optimizer configured differently; convert it with "
          "jadam.convert_state(state, optimizer, params).")
    out.append(leaf)
  return tuple(out)


def _positions(n: int, t: Array) -> list[Array]:
  """The leaves' positions 0 … n−1 as values computed at run time, so that
  the compiler cannot fold them into the leaves' loops.

  Each position seeds its leaf's rounding stream. As a constant it would be
  fused into the leaf's loops and make the loops of leaves of one shape
  distinct code, which XLA then compiles once per leaf instead of once per
  shape. Picked out of one vector by a reduction, each position reaches the
  loops as a parameter. (``t >> 31`` is 0 for every step count, which the
  compiler cannot know.)
  """
  index = jax.lax.iota(jnp.uint32, n)
  vector = index + (t >> 31).astype(jnp.uint32)
  return [jnp.max(jnp.where(index == i, vector, 0)) for i in range(n)]


def _shared_leaf_step(leaf: _rule.LeafRule, tracing: bool):
  """:func:`step_leaf` for ``leaf`` as one jitted function for the whole
  walk, so that leaves of one shape, dtype and format are traced and
  lowered once (the int8 and stochastic-rounding code is long to trace;
  under an outer ``jit`` the call is inlined by XLA, nothing changes in the
  compiled step). The rule's per-call values are passed as arguments
  (:func:`jadam._rule.split_scalars`).

  Called eagerly (``tracing`` False), the leaves are stepped op by op, so
  that an eager update rounds as optax's eager update does.
  """
  if not tracing:
    return lambda g, stored, t, scales, position, formats: step_leaf(
        g, stored, t, leaf, position, scales, formats)
  arrays, rebuild = _rule.split_scalars(leaf)
  jitted = jax.jit(
      lambda g, stored, t, scales, arrays, stream, formats: step_leaf(
          g, stored, t, rebuild(arrays), stream, scales, formats),
      static_argnums=6)
  # The leaf's position goes in as a traced argument (its stream), so that
  # leaves of one shape still share one trace.
  return lambda g, stored, t, scales, position, formats: jitted(
      g, stored, t, scales, arrays, position, formats)


def step_leaf(g: Array, stored: tuple, t: Array, leaf: _rule.LeafRule,
              stream: Any, scales: tuple, formats: tuple
              ) -> tuple[Array, tuple, tuple]:
  """Load one leaf's moments, take one step of ``leaf``, store them again.

  Args:
    g: the gradient of this leaf.
    stored: its moments (float arrays, or int8 codes), in ``leaf``'s order.
    t: the step number (int32, from 1).
    leaf: the optimizer's step on one array.
    stream: the leaf's position in its tree (an int, or a traced uint32
      scalar so that leaves of one shape share their compiled code).
      Stochastic rounding draws element ``i`` of a leaf from position ``i``
      of a stream seeded by ``t`` and ``stream``: a run is reproducible
      without a key in the state, and leaves of equal shape round
      independently. Inside ``jax.shard_map`` a shard split over manual
      axes draws from position ``shard·n + i`` (``n`` its size, ``shard``
      its index over those axes): the shards' bits are disjoint, and for a
      leaf split along its leading axis they are the whole array's.
    scales: per moment, its int8 block scales (None for a float moment).
    formats: per moment, its leaf format.

  Returns:
    ``(direction, stored, scales)``: the direction in the gradient's dtype,
    the moments and scales in their formats.
  """
  if g.size and any(isinstance(f, int8.Int8Leaf) for f in formats):
    return _step_int8(g, stored, t, leaf, stream, scales, formats)
  dtype = floats.compute_dtype(g.dtype)
  dtypes = [floats.real_dtype(dtype) if real else dtype
            for real in leaf.real]

  def step(g, stored):
    loaded = tuple(f.load(x, d) for f, x, d in zip(formats, stored, dtypes))
    direction, new = leaf.step(g.astype(dtype), loaded, leaf.scalars)
    return leaf.direction(direction, g.astype(dtype)), new

  direction, new = step(g, stored)
  # The rounding seed is traced only where something is rounded: on trees of
  # thousands of float32 leaves its integer ops would cost compile time.
  narrow = any(f.rounds for f in formats)
  seed = _rounding.leaf_seed(t, stream) if narrow else None
  offset = _rounding.shard_offset(g) if narrow else 0
  streams = _rounding.streams(None if seed is None
                              else _rounding.bits(g.shape, seed, offset))
  if _fusion.single_pass(g.size) and not leaf.cautious:
    # The direction again, from the same inputs rather than from ``new``, so
    # that the parameter loop reads what the moment loops read and XLA:CPU
    # merges them into one pass (see _fusion). A cautious direction needs a
    # mean over the whole array first, so it cannot be merged.
    direction, _ = step(*_fusion.alias((g, stored)))
    if narrow:
      # Each rounded moment from inputs of its own (see own_inputs).
      parts = []
      for k in range(len(stored)):
        (g_k, stored_k), streams_k = _rounding.own_inputs(
            (g, stored), g.shape, seed, offset, k + 1)
        parts.append((step(g_k, stored_k)[1][k], streams_k[k]))
      new = tuple(p[0] for p in parts)
      streams = [p[1] for p in parts]
  return direction.astype(g.dtype), tuple(
      f.store(value, bits) for f, value, bits in zip(formats, new, streams)
  ), scales


def _step_int8(g: Array, stored: tuple, t: Array, leaf: _rule.LeafRule,
               stream: Any, scales: tuple, formats: tuple):
  """:func:`step_leaf` of a leaf with int8 moments (:func:`int8.step`),
  guarded against differentiation unless the format allows it, and inside
  ``auto_axes`` on Explicit mesh axes."""
  seed = _rounding.leaf_seed(t, stream)
  offset = _rounding.shard_offset(g)
  # The rule's per-call values travel as arguments: a value traced outside
  # ``auto_axes`` (below) is not valid inside it. Python numbers stay
  # static, so that they round as in the plain path.
  arrays, rebuild = _rule.split_scalars(leaf)
  if not all(f.approximate_derivative for f in formats
             if isinstance(f, int8.Int8Leaf)):
    g, stored, scales, arrays = int8.not_differentiable(
        (g, stored, scales, arrays))

  def step(g, stored, t, seed, scales, arrays):
    return int8.step(g, stored, t, seed, offset, scales, rebuild(arrays),
                     formats)

  explicit = _placement.explicit_shardings((g, stored, scales))
  if explicit is not None:
    # Cutting an array split over Explicit mesh axes into blocks would need
    # its sharding spelled out at every reshape; inside ``auto_axes`` the
    # compiler places the blocks, as on Auto meshes, and the results come
    # back with the inputs' shardings.
    step = _compat.auto_axes(step, out_sharding=explicit)
  return step(g, stored, t, seed, scales, arrays)


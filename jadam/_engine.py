"""The one engine: ``init`` and ``update`` of every optimizer of the package.

An optimizer is a per-array step (``_rule.LeafRule``) and its declared
moments (``Moment``). The engine owns all but the arithmetic: storage
formats, the skip, the tree walk and its checks, rounding streams and the CPU
single pass. States are optax's classes, int8 moments ``Int8Moment`` leaves.
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
from jadam import _probe
from jadam import _rounding
from jadam import _rule
from jadam.sharding import _placement
from jadam import _skip
from jadam import _validation
from jadam._formats import floats
from jadam._formats import int8

Array = jax.Array


class Moment(NamedTuple):
  """One moment an optimizer keeps per parameter: its state ``field``,
  whether it is a ``second`` moment (of |g|², real; √v in float16 and int8)
  and whether it is a ``monotone`` running maximum rounding must not lower.
  """

  field: str
  second: bool = False
  monotone: bool = False


# Each engine state class and its moments, for readers such as describe.
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


class Spec(NamedTuple):
  """An optimizer as the engine builds it: ``transformation``'s arguments.
  Parameter groups (``_groups``) build one per group from the same maker."""

  state_class: type
  moments: tuple[Moment, ...]
  formats: tuple
  rule: Callable[[Any, Array, Optional[Array]], _rule.LeafRule]
  counters: Optional[dict] = None


def build(spec: Spec) -> optax.GradientTransformationExtraArgs:
  """``transformation`` of a ``Spec``."""
  return transformation(spec.state_class, spec.moments, spec.formats,
                        spec.rule, counters=spec.counters)


def transformation(
    state_class: type, moments: tuple[Moment, ...], formats: tuple,
    rule: Callable[[Any, Array, Optional[Array]], _rule.LeafRule], *,
    counters: Optional[dict[str, Callable[[Any, Optional[Array]], Array]]]
    = None,
) -> optax.GradientTransformationExtraArgs:
  """An optax transformation stepping ``moments`` with a per-array rule.

  ``state_class`` (optax's) has fields ``count``, the moments' (in the order
  ``rule``'s step takes them) and the ``counters``' (field -> ``fn(state,
  skip)``, the new int32 value; zero at init). ``formats``: per moment, from
  ``_formats.as_format``. ``rule(state, t, skip)``: this call's
  ``LeafRule``. The ``update`` takes the extra argument ``jadam_skip``.
  """
  declare(state_class, moments)
  counters = counters or {}

  def init_fn(params):
    trees = init_moments(params, moments, formats)
    # One zero per counter: a buffer in two places cannot be donated.
    zero = lambda: jnp.zeros([], jnp.int32)
    return _placement.place_scalars(state_class(
        count=zero(), **{name: zero() for name in counters},
        **{m.field: tree for m, tree in zip(moments, trees)}), params)

  def update_fn(updates, state, params=None, **extra_args):
    decision, skip, t = _skip.read(extra_args, state.count)
    out, trees = walk(rule(state, t, skip), updates, t,
                      [getattr(state, m.field) for m in moments], formats,
                      moments, params, probe=_probe.read(extra_args))
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
  format's layout and its parameter's Flax box."""
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


def walk(leaf: Any, updates: Any, t: Array,
         stored_trees: Sequence[Any], formats: Sequence[Any],
         moments: Sequence[Moment], params: Any = None,
         probe: Optional[_probe.Probe] = None
         ) -> tuple[Any, list[Any]]:
  """The package's one tree walk: check the gradients and the state, then
  ``step_leaf`` each leaf. ``leaf``: one ``LeafRule`` for every leaf, or a
  sequence of them, one per gradient leaf (parameter groups). ``probe``:
  the doctor's request, answered by ``inside``. Returns
  ``(directions, new_stored_trees)``."""
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
  rules = ([leaf] * len(grads) if isinstance(leaf, _rule.LeafRule)
           else list(leaf))
  steps = {}  # one shared step per distinct rule
  rows = []
  for index, (g, position) in enumerate(zip(grads, positions)):
    leaf = rules[index]
    if id(leaf) not in steps:
      steps[id(leaf)] = _shared_leaf_step(leaf, tracing)
    step = steps[id(leaf)]
    entries = [column[index] for column in columns]
    stored = tuple(x.codes if isinstance(x, int8.Int8Moment) else x
                   for x in entries)
    scales = tuple(x.scales if isinstance(x, int8.Int8Moment) else None
                   for x in entries)
    direction, values, new_scales = step(g, stored, t, scales, position,
                                         leaf_formats[index])
    if leaf.skip is not None and any(s is not None for s in scales):
      # Re-encoding unchanged int8 moments may not give the same codes.
      values = tuple(_rule.hold(leaf.skip, v, x)
                     for v, x in zip(values, stored))
      new_scales = tuple(_rule.hold(leaf.skip, s, x)
                         for s, x in zip(new_scales, scales))
    rows.append((direction, tuple(
        v if s is None else int8.Int8Moment(v, s)
        for v, s in zip(values, new_scales))))
  if probe is not None:
    probe.collect("engine", _boxes.leaf_paths(updates),
                  [g.shape for g in grads],
                  lambda i: inside(grads[i], [c[i] for c in columns],
                                   rules[i], leaf_formats[i], moments))
  directions = _boxes.restore(updates, treedef.unflatten(
      [row[0] for row in rows]))
  return directions, [
      _boxes.restore(old, treedef.unflatten([row[1][k] for row in rows]))
      for k, old in enumerate(stored_trees)]


def inside(g: Array, entries: Sequence[Any], leaf: _rule.LeafRule,
           formats: tuple, moments: Sequence[Moment]) -> dict:
  """What only the engine knows of one leaf's step, elementwise, for the
  numerics doctor: the gradient ``g`` it stepped with (after any clipping
  before it), ``v_hat`` and ``eps`` of the rule's denominator, and per
  compressed moment its float32 value before storing and after a round
  trip through its format (``stored``). Recomputed from the old moments."""
  dtype = floats.compute_dtype(g.dtype)
  dtypes = [floats.real_dtype(dtype) if real else dtype
            for real in leaf.real]
  loaded = tuple(_formats.load(x, d, second=m.second)
                 for x, d, m in zip(entries, dtypes, moments))
  g = g.astype(dtype)
  _, new = leaf.step(g, loaded, leaf.scalars)
  out = {"g": g, "stored": [(value, fmt.round_trip(value))
                            for value, fmt in zip(new, formats)
                            if fmt.rounds and value is not None]}
  if leaf.second_moment is not None:
    out["v_hat"], out["eps"] = leaf.second_moment(new, leaf.scalars)
  return out


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
  """Each moment's leaf format for gradient leaf ``index``; a ValueError if
  the state holds it otherwise. ``mu_dtype=None`` follows the parameter's
  dtype if ``update`` has it, else the stored moment's."""
  out = []
  for fmt, moment, x in zip(formats, moments, stored):
    if param_leaves is not None:
      leaf = fmt.for_leaf(tuple(g.shape), param_leaves[index].dtype,
                          second=moment.second)
    elif (isinstance(fmt, floats.Float) and fmt.dtype is None
          and not isinstance(x, int8.Int8Moment)):
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
  """The leaves' positions 0 … n−1 (rounding seeds), computed at run time.

  A constant seed would be fused into its leaf's loops, making leaves of one
  shape distinct code that XLA compiles once per leaf. Here all n come out
  of one variadic reduction (one kernel, n outputs), so each reaches the
  loops as an operand; ``t >> 31`` is always 0, which the compiler cannot
  know. (One reduction per leaf compiled n kernels: 2× the compile time at
  500 leaves, docs/design/memory.md.)
  """
  if not n:
    return []
  index = jax.lax.iota(jnp.uint32, 2)
  zero = (t >> 31).astype(jnp.uint32)
  operands = [jnp.where(index == 0, zero + jnp.uint32(i), jnp.uint32(0))
              for i in range(n)]
  return list(jax.lax.reduce(
      operands, [jnp.uint32(0)] * n,
      lambda xs, ys: [jnp.maximum(x, y) for x, y in zip(xs, ys)], (0,)))


def _shared_leaf_step(leaf: _rule.LeafRule, tracing: bool):
  """``step_leaf`` as one jitted function for the whole walk, so leaves of
  one shape, dtype and format are traced once (inlined under an outer jit).
  Eagerly it runs op by op, rounding as optax's eager update does.
  """
  if not tracing:
    return lambda g, stored, t, scales, position, formats: step_leaf(
        g, stored, t, leaf, position, scales, formats)
  arrays, rebuild = _rule.split_scalars(leaf)
  jitted = jax.jit(
      lambda g, stored, t, scales, arrays, stream, formats: step_leaf(
          g, stored, t, rebuild(arrays), stream, scales, formats),
      static_argnums=6)
  # The position is traced, so leaves of one shape share one trace.
  return lambda g, stored, t, scales, position, formats: jitted(
      g, stored, t, scales, arrays, position, formats)


def step_leaf(g: Array, stored: tuple, t: Array, leaf: _rule.LeafRule,
              stream: Any, scales: tuple, formats: tuple
              ) -> tuple[Array, tuple, tuple]:
  """Load one leaf's moments, step ``leaf``, store them again.

  ``stream`` is the leaf's position in its tree: element i draws its
  rounding bits from position i of a stream seeded by ``t`` and ``stream``
  (``shard·n + i`` in a ``shard_map`` shard), so runs reproduce without a
  key in the state and leaves round independently. ``scales``: per moment,
  int8 block scales or None. Returns ``(direction, stored, scales)``.
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
  # Seed only where something is rounded: its ops cost compile time.
  narrow = any(f.rounds for f in formats)
  seed = _rounding.leaf_seed(t, stream) if narrow else None
  offset = _rounding.shard_offset(g) if narrow else 0
  streams = _rounding.streams(None if seed is None
                              else _rounding.bits(g.shape, seed, offset))
  if _fusion.single_pass(g.size) and not leaf.cautious:
    # A cautious mean needs the new m before the direction: no one pass.
    own = None
    if narrow:
      own = lambda tag: _rounding.own_inputs((g, stored), g.shape, seed,
                                             offset, tag)
    direction, new, streams = _fusion.one_pass(step, (g, stored), new,
                                               streams, own)
  return direction.astype(g.dtype), tuple(
      f.store(value, bits) for f, value, bits in zip(formats, new, streams)
  ), scales


def _step_int8(g: Array, stored: tuple, t: Array, leaf: _rule.LeafRule,
               stream: Any, scales: tuple, formats: tuple):
  """``step_leaf`` with int8 moments: not differentiable unless the format
  allows it, and inside ``auto_axes`` on Explicit mesh axes."""
  seed = _rounding.leaf_seed(t, stream)
  offset = _rounding.shard_offset(g)
  # Per-call values as arguments: one traced outside auto_axes is invalid.
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
    # Blocks of an Explicit-sharded array would need a sharding at every
    # reshape; inside auto_axes the compiler places them.
    step = _compat.auto_axes(step, out_sharding=explicit)
  return step(g, stored, t, seed, scales, arrays)


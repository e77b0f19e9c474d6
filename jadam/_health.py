"""Training health: survive non-finite steps and watch the gradients.

Two opt-in wrappers around any optax transformation (every jadam alias, an
``optax.chain``, or a piece of one):

* :func:`skip_nonfinite` drops a step whose gradients hold NaN or Inf: the
  update is zero and the wrapped state (moments, step count, schedule
  position) is kept bit for bit, while ``skipped`` counts such steps.
* :func:`with_telemetry` keeps a few gradient-health numbers in the state
  (global gradient norm, update norm and its ratio to the parameter norm,
  largest |g|, smallest and largest second moment), and :func:`stats` finds
  them anywhere in a (chained, wrapped) optax state and returns them as a dict
  ready for a logger.

Neither wrapper touches Adam's arithmetic, which stays in :mod:`jadam._rule`;
they only look at the trees going in and out of the wrapped transformation.
"""

from __future__ import annotations

from typing import Any, Hashable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax

from jadam import _compat
from jadam import _engine
from jadam.sharding import _offload
from jadam import _rule
from jadam.sharding import _placement
from jadam import _skip
from jadam import _state
from jadam._formats import floats

Array = jax.Array
AxisName = Union[Hashable, Sequence[Hashable]]


def _axes(axis_name: Optional[AxisName]) -> Optional[tuple]:
  """``axis_name`` as a tuple of mesh axis names (None stays None)."""
  if axis_name is None:
    return None
  if isinstance(axis_name, (tuple, list)):
    return tuple(axis_name)
  return (axis_name,)


def _check_axis_name(wrapper: str, axes: Optional[tuple]) -> None:
  """Inside ``jax.shard_map`` each device sees its own shard of the
  gradients; without ``axis_name`` the wrapper would decide or measure on
  that shard alone, differently on each device."""
  if axes is None and _compat.in_manual_axes():
    raise ValueError(
        f"jadam.{wrapper} is running inside jax.shard_map without "
        f"axis_name, so each device would see only its own shard of the "
        f"gradients (a NaN on one device would be skipped there alone, a "
        f"norm would be the local one). Pass axis_name, the mesh axes the "
        f"gradients are split or differ over (for example "
        f"axis_name='data'), or axis_name=() to act on each device's shard "
        f"alone on purpose.")


def _across(partial: Array, leaf: Any, axes: Optional[tuple],
            collective) -> Array:
  """A per-leaf partial reduction of this device's shard, completed over
  the manual axes ``leaf`` is split over (replicated copies count once)."""
  if not axes:
    return partial
  names = tuple(a for a in axes if a in _compat.varying_axes(leaf))
  return collective(partial, names) if names else partial


# --------------------------------------------------------------------------
# Non-finite steps.


class SkipNonfiniteState(NamedTuple):
  """State of :func:`skip_nonfinite`.

  Attributes:
    inner_state: the wrapped transformation's state, as of the last finite
      step.
    skipped: number of steps dropped because a gradient was NaN or Inf (an
      int32 that saturates instead of wrapping).
  """

  inner_state: Any
  skipped: Array


def all_finite(tree: Any, axis_name: Optional[AxisName] = None) -> Array:
  """True when no leaf of ``tree`` holds a NaN or an Inf (a bool scalar).

  Zero-size leaves and empty trees count as finite; integer and boolean
  leaves are always finite. Inside ``jax.shard_map``, ``axis_name`` makes
  the answer the same on every device: true only if every device's shard is
  finite.
  """
  # x − x is 0 for every finite x and NaN for ±Inf and NaN, so one sum per
  # leaf answers the question. It vectorises better on CPU than an and-reduce
  # of jnp.isfinite over booleans, and unlike a plain sum it cannot overflow.
  sums = [jnp.sum(x - x) for x in jax.tree.leaves(tree)
          if jnp.size(x) and jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  finite = jnp.isfinite(sum(sums)) if sums else jnp.asarray(True)
  axes = _axes(axis_name)
  if axes:
    # A minimum over every named axis: under check_vma=False a replicated
    # value cannot be told from a split one, and the minimum of equal
    # values is that value.
    finite = jax.lax.pmin(finite.astype(jnp.int32), axes) > 0
  return finite


def skip_nonfinite(
    inner: optax.GradientTransformation,
    axis_name: Optional[AxisName] = None,
) -> optax.GradientTransformationExtraArgs:
  """Drop every step whose gradients hold a NaN or an Inf.

  On such a step the returned update is zero, so the parameters do not move,
  and the whole state of ``inner`` (first and second moments, step count,
  schedule position, clipping or accumulation state) is returned unchanged, bit
  for bit, as if the step had never been taken; ``skipped`` in the new state
  counts these steps. On a finite step the updates and state are those of
  ``inner``, up to float rounding: XLA may fuse the update differently with
  the skip flag as one more input.

  The check reads each gradient once (one reduction per leaf). The decision
  goes down to ``inner`` as the extra ``update`` argument ``jadam_skip``
  (a :class:`jadam._skip.Decision` made afresh in each call), which
  ``optax.chain``, ``inject_hyperparams``, ``MultiSteps``, ``partition``,
  ``masked`` and the other wrappers of optax's extra-args protocol forward.
  jadam's own transformations that receive it skip the step in the same
  elementwise pass that takes it (each new moment is selected against the
  old one where it is computed, leaving the moments bitwise in place), so
  protecting them costs little more than that check. Every other piece of
  state (optax transformations, states behind a wrapper that does not
  forward extra arguments, states that a wrapper such as ``MultiSteps``
  rebuilds) is
  kept with ``jnp.where`` between the new and the old value, which is
  correct for any transformation but costs a pass over large state.

  Unlike ``optax.apply_if_finite`` this never gives up and applies a bad
  update: a run whose gradients stay non-finite keeps its last good
  parameters while ``skipped`` climbs, which :func:`stats` reports.

  Args:
    inner: any optax transformation, for example ``jadam.adam(1e-3)`` or an
      ``optax.chain``. Extra update arguments are passed through, together
      with ``jadam_skip``; an ``optax.GradientTransformationExtraArgs``
      inside must therefore accept (and may ignore) unknown ones, as that
      protocol asks.
    axis_name: inside ``jax.shard_map``, the mesh axis name (or names) the
      gradients are split or differ over, as ``jax.lax.pmean`` takes it:
      the step is then skipped on every device when any device's shard is
      non-finite, so replicated state stays replicated. Required inside
      shard_map (a ValueError says so); ``()`` decides on each device's own
      shard on purpose. Leave it None under ``jax.jit`` on a mesh, where
      every reduction is already global.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`SkipNonfiniteState`.

  Raises:
    ValueError: at ``update``, inside ``jax.shard_map`` without
      ``axis_name``.

  Example:
    >>> import jax.numpy as jnp, jadam
    >>> opt = jadam.skip_nonfinite(jadam.adam(0.1))
    >>> params = {"w": jnp.ones(2)}
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": jnp.array([jnp.nan, 1.0])}, state)
    >>> updates["w"], int(state.skipped), int(state.inner_state[0].count)
    (Array([0., 0.], dtype=float32), 1, 0)

  References:
    Micikevicius et al., "Mixed Precision Training", ICLR 2018 (skipping
    steps with overflowed gradients).
  """
  inner = optax.with_extra_args_support(inner)
  axes = _axes(axis_name)

  def init_fn(params):
    return _placement.place_scalars(
        SkipNonfiniteState(inner.init(params), jnp.zeros([], jnp.int32)),
        params)

  def update_fn(updates, state, params=None, **extra_args):
    _check_axis_name("skip_nonfinite", axes)
    finite = all_finite(updates, axes)
    # A fresh signal per call: what it records about this call's updates
    # cannot reach another call, another thread, or a cached trace.
    decision = _skip.Decision(jnp.logical_not(finite))
    new_updates, new_inner = inner.update(
        updates, state.inner_state, params,
        **{**extra_args, _skip.SKIP: decision})
    new_updates = jax.tree.map(
        lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates)
    # Selected where the old value lives (host memory under jadam.sharding.offload).
    select = lambda new, old: _offload.in_memory_of(jnp.where(
        finite, _offload.on_device(new), _offload.on_device(old)), old)
    # A state returned by an update that took the decision, given exactly
    # the old state found at the same place, is already the old one on a
    # skipped step; everything else (also a recorded state found elsewhere)
    # is chosen between new and old, array by array.
    new_inner = jax.tree.map(
        lambda new, old: new if decision.taken(new, old) else jax.tree.map(
            select, new, old),
        new_inner, state.inner_state, is_leaf=decision.returned)
    skipped = jnp.where(finite, state.skipped,
                        optax.safe_increment(state.skipped))
    return new_updates, SkipNonfiniteState(new_inner, skipped)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------
# Telemetry.


class HealthStats(NamedTuple):
  """Gradient-health numbers of one step, all float32 scalars.

  Attributes:
    grad_norm: global L2 norm of the gradients going into the optimizer.
    grad_max_abs: largest |g| over all gradient entries.
    update_norm: global L2 norm of the updates coming out.
    param_norm: global L2 norm of the parameters before the update (NaN when
      ``update`` is called without ``params``).
    update_ratio: ``update_norm / param_norm``, the relative size of the step.
    nu_min: smallest entry of the stored second moment v (u for AdaMax) of
      every Adam-family state inside the wrapped optimizer, after the step;
      NaN if it has none. Raw v, not bias-corrected.
    nu_max: largest such entry.
  """

  grad_norm: Array
  grad_max_abs: Array
  update_norm: Array
  param_norm: Array
  update_ratio: Array
  nu_min: Array
  nu_max: Array


class TelemetryState(NamedTuple):
  """State of :func:`with_telemetry`.

  Attributes:
    inner_state: the wrapped transformation's state.
    stats: :class:`HealthStats` of the last measured step.
    count: number of updates seen (int32, saturating).
  """

  inner_state: Any
  stats: HealthStats
  count: Array


def _nonempty_leaves(tree: Any) -> list[Array]:
  """Leaves with at least one entry, in the rule's compute dtype or wider."""
  return [x.astype(floats.compute_dtype(x.dtype))
          for x in jax.tree.leaves(tree) if jnp.size(x)]


def _norm(tree: Any, axes: Optional[tuple] = None) -> Array:
  leaves = _nonempty_leaves(tree)
  if not leaves:
    return jnp.zeros([], jnp.float32)
  # A reduction of |x|², not jnp.vdot: vdot flattens its operands, which
  # has no sharding type for an array split over Explicit mesh axes.
  squares = [_across(jnp.sum(_rule.abs_sq(x)), x, axes, jax.lax.psum)
             for x in leaves]
  return jnp.sqrt(sum(squares)).astype(jnp.float32)


def _nan_propagating(collective):
  """``pmax``/``pmin`` that return NaN when any device's value is NaN, as
  ``jnp.max``/``jnp.min`` do on one device (the collectives drop NaN)."""
  def reduce(x, names):
    any_nan = jax.lax.pmax(jnp.isnan(x).astype(jnp.int32), names) > 0
    return jnp.where(any_nan, jnp.nan, collective(x, names))
  return reduce


_COLLECTIVES = {jnp.max: _nan_propagating(jax.lax.pmax),
                jnp.min: _nan_propagating(jax.lax.pmin)}


def _reduce(tree: Any, reduce_fn, empty: float,
            axes: Optional[tuple] = None) -> Array:
  values = [_across(reduce_fn(x).astype(jnp.float32), x, axes,
                    _COLLECTIVES[reduce_fn])
            for x in _nonempty_leaves(tree)]
  if not values:
    return jnp.asarray(empty, jnp.float32)
  return reduce_fn(jnp.stack(values))


def _is_adam_state(node: Any) -> bool:
  """An optimizer state holding a second moment ``nu`` (jadam's or optax's)."""
  return (isinstance(node, tuple) and "nu" in getattr(node, "_fields", ())
          and "count" in node._fields)


def second_moments(state: Any) -> list[Any]:
  """The ``nu`` trees of every Adam-family state found inside ``state``.

  jadam's own states are decoded from their storage format (int8 codes with
  block scales, float16 √v) to float32 values of v.
  """
  nodes = jax.tree.leaves(state, is_leaf=_is_adam_state)
  return [_state.decode_tree(node.nu, jnp.float32, second=True)
          if _engine.moments_of(node) is not None else node.nu
          for node in nodes if _is_adam_state(node)]


def _measure(grads: Any, updates: Any, params: Optional[Any],
             inner_state: Any, axes: Optional[tuple] = None) -> HealthStats:
  # The barrier keeps XLA from sharing subexpressions (such as g·g) between
  # these reductions and the optimizer's fused loops, which would force the
  # shared values to be written out to memory.
  trees = (grads, updates, params, inner_state)
  if axes:
    # One barrier per array inside shard_map: a joint barrier gives every
    # output the union of its inputs' varying axes, which would make a
    # replicated leaf look split (and its copies counted in a norm).
    trees = jax.tree.map(jax.lax.optimization_barrier, trees)
  else:
    trees = jax.lax.optimization_barrier(trees)
  grads, updates, params, inner_state = trees
  grad_norm = _norm(grads, axes)
  update_norm = _norm(updates, axes)
  if params is None:
    param_norm = jnp.asarray(jnp.nan, jnp.float32)
  else:
    param_norm = _norm(params, axes)
  # A zero parameter norm (a fresh bias-only model) makes any step infinitely
  # large relative to it; 0/0 is reported as 0 so that "no step" reads as such.
  update_ratio = jnp.where(update_norm == 0, jnp.zeros([], jnp.float32),
                           update_norm / param_norm)
  nus = second_moments(_offload.on_device(inner_state))
  return HealthStats(
      grad_norm=grad_norm,
      grad_max_abs=_reduce(jax.tree.map(jnp.abs, grads), jnp.max, 0.0,
                           axes),
      update_norm=update_norm,
      param_norm=param_norm,
      update_ratio=update_ratio,
      nu_min=_reduce(nus, jnp.min, jnp.nan, axes),
      nu_max=_reduce(nus, jnp.max, jnp.nan, axes))


def _empty_stats() -> HealthStats:
  # One array per field: a state whose leaves share a buffer cannot be
  # donated to a jitted step.
  return HealthStats(*(jnp.full([], jnp.nan, jnp.float32)
                       for _ in HealthStats._fields))


def with_telemetry(
    inner: optax.GradientTransformation,
    every: int = 1,
    axis_name: Optional[AxisName] = None,
) -> optax.GradientTransformationExtraArgs:
  """Keep gradient-health numbers of ``inner``'s steps in the state.

  The numbers (:class:`HealthStats`) describe the gradients entering
  ``inner``, the updates leaving it, the parameters passed to ``update``, and
  the second moments of every Adam-family state inside ``inner``. Read them
  with :func:`stats`. Wrap the complete optimizer so that the update norm is
  the real parameter step; wrap :func:`skip_nonfinite` (not the other way
  round) so that the bad step itself is recorded.

  Args:
    inner: any optax transformation.
    every: measure on steps 1, 1 + every, 1 + 2·every, ... and carry the last
      numbers in between (``lax.cond`` skips the reductions on other steps).
    axis_name: inside ``jax.shard_map``, the mesh axis name (or names) the
      gradients, parameters or state are split over: each number is then
      the global one, the same on every device (a leaf split over an axis is
      summed over it, a replicated one counted once, told apart by the
      values' types, so shard_map must run with ``check_vma=True``, its
      default). Required inside shard_map; ``()`` measures each device's
      shard on purpose. Leave it None under ``jax.jit`` on a mesh.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`TelemetryState`.

  Raises:
    ValueError: if ``every`` is not a positive integer; at ``update``,
      inside ``jax.shard_map`` without ``axis_name``, or with it under
      ``check_vma=False``.

  Example:
    >>> import jax.numpy as jnp, jadam
    >>> opt = jadam.with_telemetry(jadam.skip_nonfinite(jadam.adam(0.1)))
    >>> params = {"w": jnp.array([3.0, 4.0])}
    >>> state = opt.init(params)
    >>> _, state = opt.update({"w": jnp.array([0.3, -0.4])}, state, params)
    >>> {k: round(float(v), 3) for k, v in jadam.stats(state).items()}["grad_norm"]
    0.5

  References:
    Kingma & Ba (2015), Section 2.1 (the effective step is bounded by α, so
    the update-to-parameter ratio tracks α relative to the weights' scale).
  """
  if isinstance(every, bool) or not isinstance(every, int) or every < 1:
    raise ValueError(f"every must be a positive integer, got {every!r}.")
  inner = optax.with_extra_args_support(inner)
  axes = _axes(axis_name)

  def init_fn(params):
    return _placement.place_scalars(
        TelemetryState(inner.init(params), _empty_stats(),
                       jnp.zeros([], jnp.int32)), params)

  def update_fn(updates, state, params=None, **extra_args):
    _check_axis_name("with_telemetry", axes)
    if axes and not all(a in _compat.varying_axes(jax.lax.axis_index(a))
                        for a in axes):
      raise ValueError(
          "jadam.with_telemetry(axis_name=...) needs jax.shard_map's "
          "check_vma=True (its default): with check_vma=False the values "
          "carry no record of which axes they are split over, so a "
          "replicated parameter cannot be told from a split one and a norm "
          "would count its copies.")
    new_updates, new_inner = inner.update(updates, state.inner_state, params,
                                          **extra_args)
    count = optax.safe_increment(state.count)
    measure = lambda: _measure(updates, new_updates, params, new_inner, axes)
    if every == 1:
      health = measure()
    else:
      health = jax.lax.cond((count - 1) % every == 0, measure,
                            lambda: state.stats)
    return new_updates, TelemetryState(new_inner, health, count)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _find(tree: Any, node_type: type) -> list[Any]:
  """Every node of ``node_type`` in ``tree``, outermost first."""
  found = []
  def visit(node):
    if isinstance(node, node_type):
      found.append(node)
    return False  # keep descending: wrappers nest inside each other
  jax.tree_util.tree_flatten(tree, is_leaf=visit)
  return found


def stats(state: Any) -> dict[str, Array]:
  """The health numbers kept anywhere inside an optax state, for a logger.

  Searches ``state`` (the state of any chain, wrapper or partition containing
  :func:`with_telemetry`) for the outermost :class:`TelemetryState`, and adds
  the skipped-step counts of every :func:`skip_nonfinite` and
  ``optax.apply_if_finite`` state found.

  Args:
    state: an optax optimizer state (for Flax nnx, ``optimizer.opt_state``).

  Returns:
    A dict of JAX scalars (use ``float(v)`` or ``jax.device_get`` before
    printing): ``step``, ``grad_norm``, ``grad_max_abs``, ``update_norm``,
    ``param_norm``, ``update_ratio``, ``nu_min``, ``nu_max`` (see
    :class:`HealthStats`) and ``skipped_steps`` (0 when no skipping wrapper
    is present). Works inside ``jax.jit`` too.

  Raises:
    ValueError: if ``state`` holds no :class:`TelemetryState`.

  Example:
    >>> import jax.numpy as jnp, jadam
    >>> opt = jadam.with_telemetry(jadam.adam(0.1))
    >>> state = opt.init({"w": jnp.ones(2)})
    >>> "grad_norm" in jadam.stats(state), int(jadam.stats(state)["step"])
    (True, 0)
  """
  telemetry = _find(state, TelemetryState)
  if not telemetry:
    raise ValueError(
        "This optimizer state holds no telemetry; build the optimizer as "
        "jadam.with_telemetry(opt) to record gradient-health numbers.")
  skipped = jnp.zeros([], jnp.int32)
  for node in _find(state, SkipNonfiniteState):
    skipped = skipped + node.skipped
  for node in _find(state, optax.ApplyIfFiniteState):
    skipped = skipped + node.total_notfinite.astype(jnp.int32)
  out = {"step": telemetry[0].count}
  out.update(telemetry[0].stats._asdict())
  out["skipped_steps"] = skipped
  # Plain arrays even when a framework wraps state leaves (Flax nnx keeps
  # them in OptArray variables inside nnx.Optimizer.opt_state).
  return {key: jnp.asarray(value) for key, value in out.items()}

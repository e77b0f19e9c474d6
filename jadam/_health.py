"""Training health: skip non-finite steps, record gradient telemetry.

``skip_nonfinite`` and ``with_telemetry`` wrap any optax transformation and
only look at the trees going in and out (the arithmetic stays in ``_rule``);
``stats`` reads the telemetry back out of any state.
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
  """Refuse shard_map without ``axis_name``: each device would act alone."""
  if axes is None and _compat.in_manual_axes():
    raise ValueError(
        f"jadam.{wrapper} is running inside jax.shard_map without "
        f"axis_name, so each device would see only its own shard of the "
        f"gradients (a NaN on one device would be skipped there alone, a "
        f"norm would be the local one). Pass axis_name, the mesh axes the "
        f"gradients are split or differ over (for example "
        f"axis_name='data'), or axis_name=() to act on each device's shard "
        f"alone on purpose.")


def require_vma(what: str, axes: Optional[tuple]) -> None:
  """Refuse ``axes`` under ``shard_map(check_vma=False)``: its values carry
  no record of which axes they are split over, so a replicated array cannot
  be told from a split one and a reduction would count its copies."""
  if axes and not all(a in _compat.varying_axes(jax.lax.axis_index(a))
                      for a in axes):
    raise ValueError(
        f"jadam.{what} needs jax.shard_map's check_vma=True (its default): "
        "with check_vma=False the values carry no record of which axes they "
        "are split over, so a replicated parameter cannot be told from a "
        "split one and a norm would count its copies.")


def _across(partial: Array, leaf: Any, axes: Optional[tuple],
            collective) -> Array:
  """Complete a per-shard reduction over the manual axes ``leaf`` is split
  over, so that replicated copies count once."""
  if not axes:
    return partial
  names = tuple(a for a in axes if a in _compat.varying_axes(leaf))
  return collective(partial, names) if names else partial


class SkipNonfiniteState(NamedTuple):
  """State of ``skip_nonfinite``.

  Attributes:
    inner_state: the wrapped state, as of the last finite step.
    skipped: steps dropped for a NaN or Inf gradient (int32, saturating).
  """

  inner_state: Any
  skipped: Array


def all_finite(tree: Any, axis_name: Optional[AxisName] = None) -> Array:
  """Whether no leaf holds NaN or Inf, on any device of ``axis_name``."""
  # x − x is 0 for finite x, NaN otherwise: one sum per leaf that cannot
  # overflow and vectorises better on CPU than an and-reduce of isfinite.
  sums = [jnp.sum(x - x) for x in jax.tree.leaves(tree)
          if jnp.size(x) and jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  finite = jnp.isfinite(sum(sums)) if sums else jnp.asarray(True)
  axes = _axes(axis_name)
  if axes:
    # Over every named axis: under check_vma=False a replicated value looks
    # split, and the minimum of equal copies is harmless.
    finite = jax.lax.pmin(finite.astype(jnp.int32), axes) > 0
  return finite


def skip_nonfinite(
    inner: optax.GradientTransformation,
    axis_name: Optional[AxisName] = None,
) -> optax.GradientTransformationExtraArgs:
  """Drop every step whose gradients hold a NaN or an Inf.

  On such a step the update is zero and ``inner``'s whole state (moments,
  step count, schedules) is kept bit for bit, while ``skipped`` counts the
  step; unlike ``optax.apply_if_finite``, it never applies a bad step. The
  decision reaches ``inner`` as the extra ``update`` argument ``jadam_skip``:
  jadam's transformations skip inside their own pass, other state is kept
  with ``jnp.where`` (see docs/reliability.md).

  Args:
    inner: any optax transformation; extra ``update`` arguments are passed
      on, so ExtraArgs transformations inside must accept unknown ones.
    axis_name: inside ``jax.shard_map``, the mesh axes the gradients are
      split or differ over: all devices then skip together. Required there
      (else a ValueError at ``update``); ``()`` decides per shard on purpose.
      Leave it None under ``jax.jit``, where reductions are already global.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``SkipNonfiniteState``.

  Example:
    >>> import jax.numpy as jnp, jadam
    >>> opt = jadam.skip_nonfinite(jadam.adam(0.1))
    >>> state = opt.init({"w": jnp.ones(2)})
    >>> updates, state = opt.update({"w": jnp.array([jnp.nan, 1.0])}, state)
    >>> updates["w"], int(state.skipped), int(state.inner_state[0].count)
    (Array([0., 0.], dtype=float32), 1, 0)

  References:
    Micikevicius et al., "Mixed Precision Training", ICLR 2018.
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
    new_updates, new_inner = _skip.apply(
        inner, jnp.logical_not(finite), updates, state.inner_state, params,
        extra_args)
    skipped = jnp.where(finite, state.skipped,
                        optax.safe_increment(state.skipped))
    return new_updates, SkipNonfiniteState(new_inner, skipped)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class HealthStats(NamedTuple):
  """Gradient-health numbers of one step, all float32 scalars.

  Attributes:
    grad_norm: global L2 norm of the gradients going in.
    grad_max_abs: largest |g|.
    update_norm: global L2 norm of the updates coming out.
    param_norm: global L2 norm of the parameters (NaN without ``params``).
    update_ratio: ``update_norm / param_norm``.
    nu_min: smallest raw v (u for AdaMax) of any Adam-family state inside,
      after the step; NaN if there is none.
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
  """State of ``with_telemetry``.

  Attributes:
    inner_state: the wrapped state.
    stats: ``HealthStats`` of the last measured step.
    count: updates seen (int32, saturating).
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
  # Not jnp.vdot: its flattening has no sharding type under Explicit axes.
  squares = [_across(jnp.sum(_rule.abs_sq(x)), x, axes, jax.lax.psum)
             for x in leaves]
  return jnp.sqrt(sum(squares)).astype(jnp.float32)


def _nan_propagating(collective):
  """``pmax``/``pmin`` that keep NaN, as ``jnp.max``/``jnp.min`` do."""
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
  """A state with a second moment ``nu`` (jadam's or optax's)."""
  return (isinstance(node, tuple) and "nu" in getattr(node, "_fields", ())
          and "count" in node._fields)


def second_moments(state: Any) -> list[Any]:
  """The ``nu`` of every Adam-family state inside, jadam's decoded to v."""
  nodes = jax.tree.leaves(state, is_leaf=_is_adam_state)
  return [_state.decode_tree(node.nu, jnp.float32, second=True)
          if _engine.moments_of(node) is not None else node.nu
          for node in nodes if _is_adam_state(node)]


def _measure(grads: Any, updates: Any, params: Optional[Any],
             inner_state: Any, axes: Optional[tuple] = None) -> HealthStats:
  # The barrier stops XLA sharing g·g and the like with the optimizer's
  # fused loops, which would write the shared values out to memory.
  trees = (grads, updates, params, inner_state)
  if axes:
    # Per array: a joint barrier gives each output the union of the inputs'
    # varying axes, so a replicated leaf would look split.
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
  # No step reads as 0, even against a zero parameter norm.
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
  # One array per field: leaves sharing a buffer cannot be donated.
  return HealthStats(*(jnp.full([], jnp.nan, jnp.float32)
                       for _ in HealthStats._fields))


def with_telemetry(
    inner: optax.GradientTransformation,
    every: int = 1,
    axis_name: Optional[AxisName] = None,
) -> optax.GradientTransformationExtraArgs:
  """Keep gradient-health numbers (``HealthStats``) of ``inner`` in the state.

  Wrap the whole optimizer, so that the update norm is the real step, and
  wrap ``skip_nonfinite`` rather than the reverse, so that a bad step shows.

  Args:
    inner: any optax transformation.
    every: a positive int: measure on steps 1, 1 + every, ...; keep the last
      numbers in between.
    axis_name: inside ``jax.shard_map`` (with ``check_vma=True``, the
      default), the mesh axes the trees are split over, making each number
      global. Required there (else a ValueError at ``update``); ``()``
      measures each shard on purpose. Leave it None under ``jax.jit``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``TelemetryState``.

  Example:
    >>> import jax.numpy as jnp, jadam
    >>> opt = jadam.with_telemetry(jadam.skip_nonfinite(jadam.adam(0.1)))
    >>> params = {"w": jnp.array([3.0, 4.0])}
    >>> state = opt.init(params)
    >>> _, state = opt.update({"w": jnp.array([0.3, -0.4])}, state, params)
    >>> round(float(jadam.stats(state)["grad_norm"]), 3)
    0.5

  References:
    Kingma & Ba (2015), "Adam", Section 2.1: the step is bounded by α, so
    the update-to-parameter ratio tracks α against the weights' scale.
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
    require_vma("with_telemetry(axis_name=...)", axes)
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


def skipped_steps(state: Any) -> Array:
  """Steps dropped so far by every skipping wrapper inside ``state``
  (``skip_nonfinite``, ``skip_spikes``, ``optax.apply_if_finite``)."""
  from jadam import _spikes  # pylint: disable=g-import-not-at-top
  total = jnp.zeros([], jnp.int32)
  for node in _find(state, SkipNonfiniteState):
    total = total + node.skipped
  for node in _find(state, optax.ApplyIfFiniteState):
    total = total + node.total_notfinite.astype(jnp.int32)
  for node in _find(state, _spikes.SkipSpikesState):
    total = total + node.skipped
  return total


def stats(state: Any) -> dict[str, Array]:
  """The health numbers kept anywhere inside an optax state, for a logger.

  Reads the outermost ``TelemetryState`` and sums the skipped steps of every
  ``skip_nonfinite``, ``skip_spikes`` and ``optax.apply_if_finite`` inside. Works under jit.

  Args:
    state: an optax state (for Flax nnx, ``optimizer.opt_state``); a
      ValueError if it holds no ``TelemetryState``.

  Returns:
    A dict of JAX scalars: ``step``, the ``HealthStats`` fields and
    ``skipped_steps`` (0 without a skipping wrapper).

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
  out = {"step": telemetry[0].count}
  out.update(telemetry[0].stats._asdict())
  out["skipped_steps"] = skipped_steps(state)
  # Plain arrays even where Flax nnx wraps state leaves in OptArray.
  return {key: jnp.asarray(value) for key, value in out.items()}

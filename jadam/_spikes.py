"""Skip the steps whose loss or gradient norm spikes above its recent range.

``skip_spikes`` keeps the values of one signal from the last ``window``
accepted steps in its state and drops a step whose value lies more than
``threshold`` standard deviations above their mean. The step is dropped
through the same in-pass skip as ``skip_nonfinite`` (``_skip.apply``).
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jadam import _compat
from jadam import _health
from jadam import _skip
from jadam.sharding import _placement

Array = jax.Array


class SkipSpikesState(NamedTuple):
  """State of ``skip_spikes``.

  Attributes:
    inner_state: the wrapped state, as of the last accepted step.
    history: the signal's values at the last ``window`` accepted steps, the
      newest last (float32, ``[window]``); only the last ``min(count,
      window)`` entries are in use.
    count: accepted steps the statistics have seen since they (re)started
      (int32, saturating).
    mean: mean of the entries in use (float32; NaN while there are none).
    var: their sample variance, divided by n − 1 (float32; NaN below two).
    streak: spike skips in a row since the last accepted step (int32).
    skipped: steps this wrapper skipped, spikes and non-finite signals
      (int32, saturating).
    last_trigger: the call number (``calls``) of the last such skip; 0 if
      none (int32).
    last_value: the signal's value at that skip (float32); NaN if none.
    calls: ``update`` calls, excluding steps an outer skip dropped (int32,
      saturating).
  """

  inner_state: Any
  history: Array
  count: Array
  mean: Array
  var: Array
  streak: Array
  skipped: Array
  last_trigger: Array
  last_value: Array
  calls: Array


def _window_stats(history: Array, count: Array) -> tuple[Array, Array]:
  """Mean and sample variance of the newest ``min(count, window)`` entries."""
  window = history.shape[-1]
  n = jnp.minimum(count, window)
  in_use = jnp.arange(window) >= window - n
  n_float = n.astype(jnp.float32)
  # Two passes over at most `window` numbers: exact enough in float32, and no
  # running sum to drift when values leave the window.
  mean = jnp.sum(jnp.where(in_use, history, 0.0)) / jnp.maximum(n_float, 1.0)
  squares = jnp.where(in_use, jnp.square(history - mean), 0.0)
  var = jnp.sum(squares) / jnp.maximum(n_float - 1.0, 1.0)
  nan = jnp.asarray(jnp.nan, jnp.float32)
  return jnp.where(n >= 1, mean, nan), jnp.where(n >= 2, var, nan)


def _loss(updates: Any, extra_args: dict[str, Any],
          axes: Optional[tuple]) -> Array:
  """The ``loss=`` extra argument, as a float32 scalar."""
  del updates
  loss = extra_args.get("loss")
  if loss is None:
    raise ValueError(
        "jadam.skip_spikes(on='loss') needs this step's loss: pass it as "
        "an extra update argument, opt.update(grads, state, params, "
        "loss=loss), or watch the gradient norm with on='grad_norm'.")
  loss = jnp.asarray(loss)
  if loss.shape != () or not jnp.issubdtype(loss.dtype, jnp.floating):
    raise ValueError(
        f"jadam.skip_spikes(on='loss') needs loss= to be a real scalar (the "
        f"batch's mean loss), got {loss.dtype}{list(loss.shape)}.")
  loss = loss.astype(jnp.float32)
  if axes:
    # Each device's loss of its own shard of the batch; the mean of equal
    # copies is harmless, so this is right for a replicated loss too.
    loss = jax.lax.pmean(loss, axes)
  return loss


def _grad_norm(updates: Any, extra_args: dict[str, Any],
               axes: Optional[tuple]) -> Array:
  """The global L2 norm of the incoming gradients."""
  del extra_args
  _health.require_vma("skip_spikes(on='grad_norm', axis_name=...)", axes)
  if not axes:
    # Kept apart from the step's own loops: fused into them, XLA:CPU runs
    # the reduction markedly slower (docs/benchmarks.md, spike skipping).
    updates = jax.lax.optimization_barrier(updates)
  return _health._norm(updates, axes)


# What each ``on=`` reads: (updates, extra_args, axes) -> a float32 scalar.
SIGNALS = {"grad_norm": _grad_norm, "loss": _loss}


def skip_spikes(
    inner: optax.GradientTransformation,
    window: int = 128,
    threshold: float = 6.0,
    *,
    on: Literal["grad_norm", "loss"] = "grad_norm",
    warmup: Optional[int] = None,
    restart_after: Optional[int] = None,
    axis_name: Optional[_health.AxisName] = None,
) -> optax.GradientTransformationExtraArgs:
  """Drop every step whose loss or gradient norm spikes above its recent range.

  The signal s (``on``) is compared with the mean μ and the sample standard
  deviation σ of its values at the last ``window`` *accepted* steps, held in
  the state. The step is a spike, and is skipped like a non-finite step in
  ``skip_nonfinite`` (zero update, ``inner``'s whole state kept bit for bit,
  inside the moments' own pass), when

  * s is NaN or ±Inf (at any time, warmup included), or
  * at least ``warmup`` accepted steps are in the statistics and
    s − μ > ``threshold`` · σ.

  Only accepted steps enter the statistics, so neither a spike nor a NaN
  widens the range that the next steps are judged against. A lasting jump
  of the signal would then be skipped forever; with ``restart_after`` the
  statistics restart empty after that many spike skips in a row (non-finite
  skips do not count), and the next ``warmup`` steps are accepted to learn
  the new level.

  A ``jadam_skip`` passed in by an outer wrapper (``skip_nonfinite`` around
  this one) is honoured: the step is skipped and this wrapper's state is
  kept whole, as if the step had never come. The other extra ``update``
  arguments (``loss`` included) are passed on to ``inner``.

  Args:
    inner: any optax transformation; extra ``update`` arguments are passed
      on, so ExtraArgs transformations inside must accept unknown ones.
    window: how many accepted values the statistics hold (an int, ≥ 2).
    threshold: how many standard deviations above the mean make a spike (a
      positive number). The rule is one-sided: a drop is never a spike.
    on: the signal. ``"grad_norm"``: the global L2 norm of the incoming
      gradients (a norm that overflows float32 counts as non-finite).
      ``"loss"``: the real scalar passed as ``opt.update(grads, state,
      params, loss=loss)``; a ValueError if it is missing.
    warmup: accepted steps before a finite value can be a spike (an int,
      ≥ 2). Default ``max(2, window // 4)``: enough values for σ to be
      estimated, while the first rise of a fresh run is still accepted.
    restart_after: spike skips in a row after which the statistics restart
      (a positive int), or None (the default) to keep them and keep
      skipping.
    axis_name: inside ``jax.shard_map``, the mesh axes the gradients (or the
      loss) are split or differ over: the norm is global (``check_vma=True``
      needed) or the loss averaged over them, and all devices decide alike.
      Required there (else a ValueError at ``update``); ``()`` decides per
      shard on purpose. Leave it None under ``jax.jit``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``SkipSpikesState``.

  Example:
    >>> import jax.numpy as jnp, jadam
    >>> opt = jadam.skip_spikes(jadam.adam(0.1), window=8, warmup=4)
    >>> state = opt.init({"w": jnp.ones(2)})
    >>> for g in [1.0, 1.1, 0.9, 1.0, 1.05, 100.0]:
    ...   updates, state = opt.update({"w": jnp.full(2, g)}, state)
    >>> updates["w"], int(state.skipped), int(state.last_trigger)
    (Array([0., 0.], dtype=float32), 1, 6)

  References:
    OLMo-core's ``SkipStepOptimizer`` (allenai/OLMo-core,
    ``src/olmo_core/optim/skip_step_optimizer.py``) applies the same
    one-sided test to the loss and the gradient norm together, over a window
    of every step's value, skipped or not, kept outside the checkpointed
    state. Here the window holds accepted steps only and is part of the
    state; docs/reliability.md compares the two.
  """
  if isinstance(window, bool) or not isinstance(window, int) or window < 2:
    raise ValueError(f"window must be an integer of at least 2, got "
                     f"{window!r}.")
  if not threshold > 0:
    raise ValueError(f"threshold must be a positive number of standard "
                     f"deviations, got {threshold!r}.")
  if on not in SIGNALS:
    raise ValueError(f"on must be one of {tuple(SIGNALS)}, got {on!r}.")
  signal = SIGNALS[on]
  if warmup is None:
    warmup = max(2, window // 4)
  if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 2:
    raise ValueError(f"warmup must be an integer of at least 2 (a standard "
                     f"deviation needs two values), got {warmup!r}.")
  if restart_after is not None and (
      isinstance(restart_after, bool) or not isinstance(restart_after, int)
      or restart_after < 1):
    raise ValueError(f"restart_after must be a positive integer or None, "
                     f"got {restart_after!r}.")
  inner = optax.with_extra_args_support(inner)
  axes = _health._axes(axis_name)
  threshold = float(threshold)

  def init_fn(params):
    zero = lambda: jnp.zeros([], jnp.int32)
    nan = lambda: jnp.full([], jnp.nan, jnp.float32)
    state = _placement.place_scalars(SkipSpikesState(
        inner_state=inner.init(params),
        history=jnp.zeros([window], jnp.float32), count=zero(), mean=nan(),
        var=nan(), streak=zero(), skipped=zero(), last_trigger=zero(),
        last_value=nan(), calls=zero()), params)
    # The window is not a scalar: place it where the scalars went, spelled
    # as a jitted step returns it, so that the second step does not compile.
    like = state.count
    if (isinstance(like, jax.Array) and not _compat.is_tracer(like)
        and like.committed):
      state = state._replace(history=jax.device_put(
          state.history, _placement.as_returned(like.sharding, 1)))
    return state

  def update_fn(updates, state, params=None, **extra_args):
    _health._check_axis_name("skip_spikes", axes)
    value = signal(updates, extra_args, axes)
    outer, outer_skip, calls = _skip.read(extra_args, state.calls)

    finite = jnp.isfinite(value)
    ready = state.count >= warmup
    # Before warmup, mean and var may be NaN: the comparison is then False.
    high = value - state.mean > threshold * jnp.sqrt(state.var)
    ours = jnp.logical_or(jnp.logical_not(finite),
                          jnp.logical_and(ready, high))
    skip = ours
    if outer_skip is not None:
      skip = jnp.logical_or(ours, outer_skip)
      ours = jnp.logical_and(ours, jnp.logical_not(outer_skip))
    new_updates, new_inner = _skip.apply(inner, skip, updates,
                                         state.inner_state, params,
                                         extra_args)

    accepted = jnp.logical_not(skip)
    spike_skip = jnp.logical_and(ours, finite)
    streak = jnp.where(accepted, 0,
                       jnp.where(spike_skip, state.streak + 1, state.streak))
    if restart_after is None:
      restart = jnp.asarray(False)
    else:
      restart = jnp.logical_and(spike_skip, streak >= restart_after)
    # An exact window rather than an exponential moving mean and variance:
    # `window` floats are cheap, "the last `window` accepted steps" then
    # holds literally, and there is no early bias to correct while it fills.
    history = jnp.where(
        accepted, jnp.concatenate([state.history[1:], value[None]]),
        state.history)
    count = jnp.where(accepted, optax.safe_increment(state.count),
                      jnp.where(restart, jnp.zeros_like(state.count),
                                state.count))
    changed = jnp.logical_or(accepted, restart)
    mean, var = _window_stats(history, count)
    new_state = SkipSpikesState(
        inner_state=new_inner,
        history=history,
        count=count,
        mean=jnp.where(changed, mean, state.mean),
        var=jnp.where(changed, var, state.var),
        streak=jnp.where(restart, 0, streak),
        skipped=jnp.where(ours, optax.safe_increment(state.skipped),
                          state.skipped),
        last_trigger=jnp.where(ours, calls, state.last_trigger),
        last_value=jnp.where(ours, value, state.last_value),
        calls=calls)
    # An outer wrapper need not select this state: where it skipped, every
    # field above is the old one.
    _skip.record(outer, state, new_state)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

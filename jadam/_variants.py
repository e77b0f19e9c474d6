"""Adam's younger relatives, written as compositions over :mod:`jadam._rule`.

Each variant here changes what Adam remembers or where it evaluates the
gradient, not how a moment is averaged or corrected: the arithmetic comes from
the rule module (``ema``, ``abs_sq``, ``bias_correction``, ``denominator``,
``adam_step``), and each is a per-array step handed to the engine
(:mod:`jadam._engine`), so storage formats, the in-pass skip and sharding
apply to them as to Adam.

* ADOPT (Taniguchi et al., 2024): normalise g_t by the *previous* second
  moment before it enters the first moment, so that the step does not
  correlate with g_t; converges for any β2.
* AdEMAMix (Pagliardini et al., 2024): add a slow EMA of the gradient
  (β3 ≈ 0.9999), weighted by α, to Adam's numerator.
* Schedule-free AdamW (Defazio et al., 2024): Adam without momentum, run
  inside optax's schedule-free interpolation and averaging; evaluate the model
  at :func:`schedule_free_eval_params`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import optax
from optax import contrib as optax_contrib

from jadam import _alias
from jadam import _engine
from jadam import _rule
from jadam import _sharding
from jadam import _transform
from jadam import _validation

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]


def _check_decay(name: str, value: Any) -> None:
  if not callable(value):
    _validation.check_decay(name, value)


# ---------------------------------------------------------------------------
# ADOPT
# ---------------------------------------------------------------------------


def _clip(x: Array, bound: Array) -> Array:
  """Clip to [−bound, bound]; for complex x, clip the modulus."""
  if jnp.iscomplexobj(x):
    modulus = jnp.abs(x)
    return x * jnp.where(modulus > bound, bound / jnp.where(
        modulus > 0, modulus, 1), 1).astype(x.dtype)
  return jnp.clip(x, -bound, bound)


def scale_by_adopt(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.9999,
    eps: ArrayLike = 1e-6,
    mu_dtype: Optional[Any] = None,
    *,
    nesterov: bool = False,
    use_clipping: bool = True,
    clip_value_fn: Callable[[Array], Array] = lambda t: t**0.25,
    nu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  """Rescale gradients by ADOPT: normalise by v_{t-1}, then average.

  Per array, with t counting updates from 0 (Taniguchi et al., Algorithm 2)::

      t = 0:  v_0 = g_0²,  direction 0 (only the scale is measured)
      t ≥ 1:  m_t = β1·m_{t-1} + (1 − β1)·clip(g_t / max(√v_{t-1}, ε), t^¼)
              v_t = β2·v_{t-1} + (1 − β2)·g_t²
              direction m_t

  Because v_{t-1} does not contain g_t, the normalised gradient is an
  unbiased direction and the method converges for any β2. The clipping
  (on by default, as in the authors' code) tames the first steps.

  Args:
    b1: decay of the first moment, in [0, 1).
    b2: decay of the second moment, in [0, 1).
    eps: floor of √v in the normalisation, >= 0.
    mu_dtype, nu_dtype: storage of m and v, as in :func:`jadam.scale_by_adam`.
    nesterov: return ``β1·m_t + (1 − β1)·ĝ_t`` (look-ahead) instead of m_t.
    use_clipping: clip the normalised gradient to ``clip_value_fn(t)``.
    clip_value_fn: bound as a function of the update count t.

  Returns:
    An ``optax.GradientTransformation`` with state
    :class:`jadam.ScaleByAdamState`.

  Example:
    >>> import jax.numpy as jnp, jadam
    >>> tx = jadam.scale_by_adopt()
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> out, state = tx.update({"w": jnp.array([3., -4.])}, state)
    >>> out["w"]  # the first call only measures v_0
    Array([0., 0.], dtype=float32)

  References:
    Taniguchi et al., "ADOPT: Modified Adam Can Converge with Any β2 with the
    Optimal Rate", NeurIPS 2024.
  """
  _validation.check_decay("b1", b1)
  _validation.check_decay("b2", b2)
  _validation.check_nonnegative("eps", eps)

  def step(g, moments, s):
    mu, nu = moments
    normalized = g / jnp.maximum(jnp.sqrt(nu), s["eps"])
    if s["bound"] is not None:
      normalized = _clip(normalized, s["bound"])
    new_mu = _rule.ema(normalized, mu, s["b1_t"], s["skip"])
    new_nu = _rule.ema(_rule.abs_sq(g), nu, s["b2_t"], s["skip"])
    direction = (_rule.ema(normalized, new_mu, s["b1_t"]) if nesterov
                 else new_mu)
    return direction, (new_mu, new_nu)

  def bounds(g_max, old, s):
    # v's recurrence bounds it by G², as Adam's; m averages g normalised by
    # each element's own √v, which G does not bound (only the clip does,
    # loosely), so m takes its blocks' exact maxima.
    _, g_nu = g_max
    return (None, None if g_nu is None
            else _rule.ema(g_nu * g_nu, old[1], s["b2_t"]))

  def rule(state, t, skip):
    first = state.count == 0
    # The first call sets v_0 = g_0² and leaves m at zero (decays 0 and 1).
    scalars = dict(t=t, skip=skip, b1_t=jnp.where(first, 1.0, b1),
                   b2_t=jnp.where(first, 0.0, b2), eps=eps,
                   bound=clip_value_fn(state.count) if use_clipping else None)
    return _rule.LeafRule(step, (False, True), bounds, scalars=scalars)

  return _engine.transformation(
      _transform.ScaleByAdamState, _transform.ADAM_MOMENTS,
      _transform.formats(mu_dtype, nu_dtype), rule)


def adopt(
    learning_rate: ScalarOrSchedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.9999,
    eps: ArrayLike = 1e-6,
    mu_dtype: Optional[Any] = None,
    *,
    nesterov: bool = False,
    use_clipping: bool = True,
    clip_value_fn: Callable[[Array], Array] = lambda t: t**0.25,
    nu_dtype: Optional[Any] = None,
    weight_decay: Optional[ScalarOrSchedule] = None,
    mask: _alias.MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
  """ADOPT (Taniguchi et al., 2024); same keywords as ``optax.contrib.adopt``.

  Args:
    learning_rate: α, a float, a jax scalar or an optax schedule.
    b1, b2, eps, mu_dtype, nesterov, use_clipping, clip_value_fn, nu_dtype:
      see :func:`scale_by_adopt`.
    weight_decay: optional decoupled weight decay λ (``−α·λ·θ``).
    mask: where the decay applies, as in :func:`jadam.adamw`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jadam
    >>> opt = jadam.adopt(1e-3)

  References:
    Taniguchi et al., "ADOPT: Modified Adam Can Converge with Any β2 with the
    Optimal Rate", NeurIPS 2024.
  """
  return _alias.optimizer(
      scale_by_adopt(b1, b2, eps, mu_dtype, nesterov=nesterov,
                     use_clipping=use_clipping, clip_value_fn=clip_value_fn,
                     nu_dtype=nu_dtype),
      learning_rate, weight_decay, mask)


# ---------------------------------------------------------------------------
# AdEMAMix
# ---------------------------------------------------------------------------


# optax.contrib's state class, for every storage format, so that
# checkpoints move between the two.
ScaleByAdemamixState = optax_contrib.ScaleByAdemamixState
# The engine's order: m1 and v first, where Adam keeps m and v, so that they
# are stored exactly as jadam.adam stores them (the same random streams and
# int8 bounds: tested), then the slow EMA m2.
ADEMAMIX_MOMENTS = (_engine.Moment("m1"), _engine.Moment("nu", second=True),
                    _engine.Moment("m2"))


def scale_by_ademamix(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    b3: ScalarOrSchedule = 0.9999,
    alpha: ScalarOrSchedule = 6.0,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: Optional[Any] = None,
    *,
    nu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  """Rescale gradients by AdEMAMix: Adam plus a slow, uncorrected EMA.

  Per array::

      m1_t = β1·m1_{t-1} + (1 − β1)·g_t      (Adam's m, bias-corrected)
      m2_t = β3·m2_{t-1} + (1 − β3)·g_t      (slow; not corrected, so it
                                              fills in over ~1/(1 − β3) steps)
      v_t  = β2·v_{t-1}  + (1 − β2)·g_t²
      direction = (m̂1_t + α·m2_t) / (√(v̂_t + ε_root) + ε)

  The paper warms α and β3 up over the first steps; pass optax schedules
  (functions of the update count) as ``alpha`` and ``b3`` for that:
  ``alpha=optax.linear_schedule(0., 5., T)`` and
  ``b3=jadam.ademamix_b3_schedule(0.9999, T)``.

  Args:
    b1: decay of the fast EMA, in [0, 1).
    b2: decay of the second moment, in [0, 1).
    b3: decay of the slow EMA, in [0, 1), or a schedule.
    alpha: weight of the slow EMA, >= 0, or a schedule.
    eps, eps_root: as in :func:`jadam.scale_by_adam`.
    mu_dtype: storage of both EMAs of g.
    nu_dtype: storage of v.

  Returns:
    An ``optax.GradientTransformation`` with state
    :class:`ScaleByAdemamixState` (``optax.contrib``'s).

  Example:
    >>> import jadam
    >>> tx = jadam.scale_by_ademamix(b3=0.999, alpha=5.0)

  References:
    Pagliardini, Ablin & Grangier, "The AdEMAMix Optimizer: Better, Faster,
    Older", ICLR 2025 (arXiv:2409.03137).
  """
  rule = _rule.AdamRule(b1, b2, eps, eps_root)
  _transform.check_rule(rule)
  _check_decay("b3", b3)
  _validation.check_nonnegative("alpha", alpha, schedule=True)
  mu_format, nu_format = _transform.formats(mu_dtype, nu_dtype)

  def step(g, moments, s):
    m1, nu, m2 = moments
    r, skip, c = s["rule"], s["skip"], s["corrections"]
    m1 = _rule.ema(g, m1, r.b1, skip)
    m2 = _rule.ema(g, m2, s["b3_t"], skip)
    nu = _rule.ema(_rule.abs_sq(g), nu, r.b2, skip)
    m1_hat = m1 / c.mu.astype(m1.dtype)
    v_hat = nu / c.nu.astype(nu.dtype)
    direction = (m1_hat + s["alpha_t"] * m2) / _rule.denominator(v_hat, r)
    return direction, (m1, nu, m2)

  def bounds(g_max, old, s):
    # m1 and v as Adam's m and v. The slow EMA m2 averages signed gradients
    # over ~1/(1 − β3) steps, so it sits far below the EMA of |g|'s block
    # maxima (which bounds it); scaled by that bound, int8 m2 lost precision
    # on the Zipf embedding of docs/memory.md, so m2 takes its blocks' exact
    # maxima.
    g1, g_nu, _ = g_max
    r = s["rule"]
    return (None if g1 is None else _rule.ema(g1, old[0], r.b1),
            None if g_nu is None else _rule.ema(g_nu * g_nu, old[1], r.b2),
            None)

  def leaf_rule(state, t, skip):
    # Schedules see the number of updates already taken, as optax's do.
    scalars = dict(
        t=t, skip=skip, rule=rule,
        b3_t=b3(state.count_m2) if callable(b3) else b3,
        alpha_t=alpha(state.count_m2) if callable(alpha) else alpha,
        corrections=_rule.corrections(rule.b1, rule.b2, t))
    return _rule.LeafRule(step, (False, True, False), bounds,
                          scalars=scalars)

  def count_m2(state, skip):
    new = optax.safe_increment(state.count_m2)
    return new if skip is None else jnp.where(skip, state.count_m2, new)

  return _engine.transformation(
      ScaleByAdemamixState, ADEMAMIX_MOMENTS,
      (mu_format, nu_format, mu_format), leaf_rule,
      counters={"count_m2": count_m2})


def ademamix_b3_schedule(b3: float, warmup_steps: int,
                         b_start: float = 0.9) -> optax.Schedule:
  """The paper's warmup of β3: the slow EMA's half-life grows linearly.

  An EMA with decay β forgets half of a gradient's weight after
  ``h(β) = ln ½ / ln β`` steps. Raising β3 linearly would leave h tiny for
  most of the warmup and then shoot up; Pagliardini et al. (Section 3)
  instead interpolate h linearly from ``h(b_start)`` to ``h(b3)`` over
  ``warmup_steps`` and map back, ``β = ½^(1/h)``, so that early, noisy
  gradients are not kept for thousands of steps.

  Args:
    b3: the final β3, in (0, 1).
    warmup_steps: steps over which to warm up; ``b3`` from then on.
    b_start: the initial β3 (the paper uses β1), in (0, b3].

  Returns:
    An optax schedule of the update count, for ``ademamix(b3=...)``.

  Example:
    >>> import optax, jadam
    >>> opt = jadam.ademamix(1e-3, b3=jadam.ademamix_b3_schedule(0.9999, 1000),
    ...                      alpha=optax.linear_schedule(0.0, 5.0, 1000))

  References:
    Pagliardini, Ablin & Grangier, "The AdEMAMix Optimizer: Better, Faster,
    Older", ICLR 2025, Section 3 (the f_β3 scheduler).
  """
  _validation.check_decay("b3", b3)
  _validation.check_decay("b_start", b_start)
  if not 0.0 < b_start <= b3:
    raise ValueError(f"b_start must be in (0, b3] = (0, {b3}], got "
                     f"{b_start!r}.")
  if not (isinstance(warmup_steps, int) and warmup_steps > 0):
    raise ValueError(f"warmup_steps must be a positive int, got "
                     f"{warmup_steps!r}.")
  # In float64 here: 0.9999 rounded to float32 has 1.7e-4 of its 1 − β off.
  half_life = lambda beta: math.log(0.5) / math.log(beta)
  start, end = half_life(float(b_start)), half_life(float(b3))

  def schedule(count):
    fraction = jnp.clip(count / warmup_steps, 0.0, 1.0)
    warming = 0.5 ** (1.0 / ((1.0 - fraction) * start + fraction * end))
    return jnp.where(count < warmup_steps, warming, b3)

  return schedule


def ademamix(
    learning_rate: ScalarOrSchedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    b3: ScalarOrSchedule = 0.9999,
    alpha: ScalarOrSchedule = 5.0,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: Optional[Any] = None,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: _alias.MaskOrFn = None,
    *,
    nu_dtype: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  """AdEMAMix with decoupled weight decay; keywords as optax.contrib.ademamix.

  The update is ``−α_lr·((m̂1 + α·m2)/(√v̂ + ε) + λ·θ)``.

  Args:
    learning_rate: the step size, a float, a jax scalar or an optax schedule.
    b1, b2, b3, alpha, eps, eps_root, mu_dtype, nu_dtype: see
      :func:`scale_by_ademamix`.
    weight_decay: λ, >= 0.
    mask: where the decay applies, as in :func:`jadam.adamw`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import optax, jadam
    >>> opt = jadam.ademamix(1e-3, alpha=optax.linear_schedule(0., 5., 1000))

  References:
    Pagliardini, Ablin & Grangier, "The AdEMAMix Optimizer: Better, Faster,
    Older", ICLR 2025 (arXiv:2409.03137).
  """
  return _alias.optimizer(
      scale_by_ademamix(b1, b2, b3, alpha, eps, eps_root, mu_dtype,
                        nu_dtype=nu_dtype),
      learning_rate, weight_decay, mask)


# ---------------------------------------------------------------------------
# Schedule-free AdamW
# ---------------------------------------------------------------------------


# The state optax's schedule-free AdamW keeps for its base step
# (``optax.scale_by_rms(bias_correction=True)``'s: count and nu), so that its
# checkpoints restore into jadam; optax does not export the class, so it is
# taken from that transformation's init, traced abstractly (nothing runs on
# a backend at import: jadam.enable_cpu_fusion must come first).
ScaleBySecondMomentState = type(jax.eval_shape(
    optax.scale_by_rms(bias_correction=True).init, ()))


def _scale_by_adam_without_momentum(
    b2: ArrayLike, eps: ArrayLike,
    nu_dtype: Optional[Any]) -> optax.GradientTransformation:
  """Adam with β1 = 0, storing only v: the base step of schedule-free AdamW.

  With β1 = 0, m_t = g_t and m̂_t = g_t, so m need not be kept; v is still
  stepped by the Adam rule, fed a zero m_{t-1}. The direction is g_t times
  the reciprocal of the denominator, rounded as optax's base step
  (``optax.scale_by_rms``) rounds it, rather than one division.
  """
  rule = _rule.AdamRule(0.0, b2, eps)
  _transform.check_rule(rule)

  def leaf_rule(state, t, skip):
    adam = _rule.leaf_rule(rule, t, skip)

    def step(g, moments, s):
      (nu,) = moments
      _, (_, new_nu) = adam.step(g, (jnp.zeros_like(g), nu), s)
      v_hat = new_nu / s["corrections"].nu.astype(new_nu.dtype)
      return (1 / _rule.denominator(v_hat, s["rule"])) * g, (new_nu,)

    def bounds(g_max, old, s):
      return adam.bounds((None,) + tuple(g_max), (None,) + tuple(old), s)[1:]

    return _rule.LeafRule(step, (True,), bounds, scalars=adam.scalars)

  return _engine.transformation(
      ScaleBySecondMomentState, (_engine.Moment("nu", second=True),),
      _transform.formats(None, nu_dtype)[1:], leaf_rule)


ScheduleFreeState = optax_contrib.ScheduleFreeState


def schedule_free_adamw(
    learning_rate: ScalarOrSchedule = 0.0025,
    warmup_steps: Optional[int] = None,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    weight_decay: ScalarOrSchedule = 0.0,
    weight_lr_power: ArrayLike = 2.0,
    state_dtype: Optional[Any] = None,
    *,
    mask: _alias.MaskOrFn = None,
    nu_dtype: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  """Schedule-free AdamW (Defazio et al., 2024); keywords as optax's.

  Adam without momentum (β1 = 0) takes the base steps on a sequence z; the
  gradient is evaluated at ``y = (1 − β1)·z + β1·x``, where x is a running
  average of z weighted by ``max_lr^weight_lr_power``. No decaying learning
  rate schedule is needed (a warmup is). The parameters the optimizer updates
  are y: **evaluate and save the model at x**, given by
  :func:`schedule_free_eval_params`.

  The interpolation and averaging are ``optax.contrib.schedule_free``; the
  base step is jadam's Adam rule storing only v.

  Args:
    learning_rate: peak step size, a float or a schedule (no decay needed).
    warmup_steps: if given, a linear warmup from 0 over this many steps.
    b1: interpolation weight β1 of x in y, in (0, 1) (it replaces momentum).
    b2, eps: as in :func:`jadam.scale_by_adam`.
    weight_decay: λ, >= 0, applied at y as ``−lr·λ·y`` (the authors' form).
    weight_lr_power: averaging weight of each step is ``max_lr`` to this power.
    state_dtype: storage dtype of z (None: the parameters').
    mask: where the decay applies, as in :func:`jadam.adamw`.
    nu_dtype: storage of v, as in :func:`jadam.scale_by_adam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    ``optax.contrib.ScheduleFreeState``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jadam
    >>> opt = jadam.schedule_free_adamw(1e-2, warmup_steps=10)
    >>> params = {"w": jnp.ones(2)}
    >>> state = opt.init(params)
    >>> grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
    >>> updates, state = opt.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> eval_params = jadam.schedule_free_eval_params(state, params)

  References:
    Defazio, Yang, Mehta, Mishchenko, Khaled & Cutkosky, "The Road Less
    Scheduled", NeurIPS 2024 (arXiv:2405.15682).
  """
  _validation.check_learning_rate(learning_rate)
  _validation.check_decay("b1", b1)
  concrete_b1 = _validation.concrete(b1)  # None when traced (inject + jit)
  if concrete_b1 is not None and float(concrete_b1) <= 0.0:
    raise ValueError(f"b1 must be in (0, 1) for schedule-free AdamW (x is "
                     f"recovered from y by dividing by b1), got {b1!r}.")
  _validation.check_nonnegative("weight_decay", weight_decay,
                                schedule=True)
  _validation.check_nonnegative("weight_lr_power", weight_lr_power)
  if warmup_steps is not None:
    learning_rate = _with_linear_warmup(learning_rate, warmup_steps)
  base = optax.chain(
      _scale_by_adam_without_momentum(b2, eps, nu_dtype),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate))
  # Its averaging weights and step count are made by optax's init.
  return _sharding.placing_scalars(_dtypes_kept(optax_contrib.schedule_free(
      base, learning_rate=learning_rate, b1=b1,
      weight_lr_power=weight_lr_power, state_dtype=state_dtype)))


def _dtypes_kept(tx: optax.GradientTransformation
                 ) -> optax.GradientTransformationExtraArgs:
  """``tx`` whose ``update`` returns every state array in the dtype ``init``
  gave it.

  optax's schedule-free wrapper makes its averaging weights in the
  parameters' dtype and updates them with the learning rate's: a float32
  learning rate injected by ``optax.inject_hyperparams`` turned bfloat16
  weights into float32 after one step, a new signature for the jitted step
  (it compiled again) and a state that no longer matched its checkpoint.
  """
  tx = optax.with_extra_args_support(tx)

  def update_fn(updates, state, params=None, **extra_args):
    updates, new_state = tx.update(updates, state, params, **extra_args)
    return updates, jax.tree.map(
        lambda new, old: new.astype(old.dtype) if hasattr(old, "dtype")
        else new, new_state, state)
  return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def _with_linear_warmup(learning_rate: ScalarOrSchedule,
                        warmup_steps: int) -> optax.Schedule:
  """``learning_rate`` ramped up linearly from 0 over ``warmup_steps``.

  A constant becomes optax's ``warmup_constant_schedule`` (bitwise what
  optax's schedule-free AdamW uses); a schedule is multiplied by the same
  ramp, so that a float or a schedule are both accepted as documented.
  """
  if not callable(learning_rate):
    return optax.warmup_constant_schedule(
        init_value=0.0, peak_value=learning_rate, warmup_steps=warmup_steps)
  ramp = optax.linear_schedule(0.0, 1.0, warmup_steps)
  return lambda count: ramp(count) * learning_rate(count)


def schedule_free_eval_params(state: optax.OptState, params: Any) -> Any:
  """The parameters to evaluate (and save) a schedule-free model at: x.

  Training updates y; x is recovered as ``(y − (1 − β1)·z) / β1``. ``state``
  may be the schedule-free state itself or any optimizer state that holds
  exactly one (for example inside ``optax.chain`` or
  ``optax.inject_hyperparams``).

  Args:
    state: the optimizer state.
    params: the current (training) parameters y.

  Returns:
    x, with the structure of ``params``.

  Raises:
    ValueError: if ``state`` holds no schedule-free state, or several.

  Example:
    >>> import jax.numpy as jnp, optax, jadam
    >>> opt = optax.chain(optax.clip_by_global_norm(1.0),
    ...                   jadam.schedule_free_adamw(1e-2))
    >>> params = {"w": jnp.ones(2)}
    >>> x = jadam.schedule_free_eval_params(opt.init(params), params)

  References:
    Defazio et al., "The Road Less Scheduled", NeurIPS 2024.
  """
  is_sf = lambda node: isinstance(node, ScheduleFreeState)
  found = [node for node in jax.tree.leaves(state, is_leaf=is_sf)
           if is_sf(node)]
  if len(found) != 1:
    raise ValueError(
        f"schedule_free_eval_params needs an optimizer state holding exactly "
        f"one schedule-free state (from jadam.schedule_free_adamw); found "
        f"{len(found)}.")
  return optax_contrib.schedule_free_eval_params(found[0], params)

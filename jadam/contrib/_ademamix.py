"""AdEMAMix (Pagliardini et al., ICLR 2025): Adam plus a slow EMA of the
gradient in the numerator; a per-array step on ``jadam._engine``."""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import optax
from optax import contrib as optax_contrib

from jadam import _alias
from jadam import _engine
from jadam import _rule
from jadam import _transform
from jadam import _validation

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]


def _check_decay(name: str, value: Any) -> None:
  if not callable(value):
    _validation.check_decay(name, value)


# optax.contrib's state class, so that checkpoints move between the two.
ScaleByAdemamixState = optax_contrib.ScaleByAdemamixState
# m1 and v where Adam keeps m and v, so they are stored exactly as Adam's.
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
      m2_t = β3·m2_{t-1} + (1 − β3)·g_t      (slow, not corrected)
      v_t  = β2·v_{t-1}  + (1 − β2)·g_t²
      direction = (m̂1_t + α·m2_t) / (√(v̂_t + ε_root) + ε)

  For the paper's warmup pass schedules as ``alpha`` and ``b3`` (see
  ``ademamix_b3_schedule``).

  Args:
    b1, b2: decays of the fast EMA and of the second moment, in [0, 1).
    b3: decay of the slow EMA, in [0, 1), or a schedule.
    alpha: weight of the slow EMA, >= 0, or a schedule.
    eps, eps_root: as in ``jadam.scale_by_adam``.
    mu_dtype, nu_dtype: storage of both EMAs of g, and of v.

  Returns:
    An ``optax.GradientTransformation`` with optax's ``ScaleByAdemamixState``.

  Example:
    >>> import jadam
    >>> tx = jadam.contrib.scale_by_ademamix(b3=0.999, alpha=5.0)

  References:
    Pagliardini, Ablin & Grangier, "The AdEMAMix Optimizer: Better, Faster,
    Older", ICLR 2025 (arXiv:2409.03137).
  """
  return _engine.build(_spec(b1, b2, b3, alpha, eps, eps_root, mu_dtype,
                             nu_dtype))


def _spec(b1, b2, b3, alpha, eps, eps_root, mu_dtype,
          nu_dtype) -> _engine.Spec:
  """``scale_by_ademamix``'s engine ``Spec``."""
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
    # m2 averages signed gradients, far below the |g| bound: exact maxima.
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
                          scalars=scalars, second_moment=second_moment)

  def second_moment(new, s):
    c = s["corrections"]
    return new[1] / c.nu.astype(new[1].dtype) + eps_root, eps

  def count_m2(state, skip):
    new = optax.safe_increment(state.count_m2)
    return new if skip is None else jnp.where(skip, state.count_m2, new)

  return _engine.Spec(
      ScaleByAdemamixState, ADEMAMIX_MOMENTS,
      (mu_format, nu_format, mu_format), leaf_rule, {"count_m2": count_m2})


def ademamix_b3_schedule(b3: float, warmup_steps: int,
                         b_start: float = 0.9) -> optax.Schedule:
  """The paper's warmup of β3: the slow EMA's half-life grows linearly.

  The half-life ``h(β) = ln ½ / ln β`` goes linearly from ``h(b_start)`` to
  ``h(b3)``, mapped back as ``β = ½^(1/h)``; a linear β3 would keep h tiny,
  then shoot up.

  Args:
    b3: the final β3, in (0, 1).
    warmup_steps: steps over which to warm up; ``b3`` from then on.
    b_start: the initial β3 (the paper uses β1), in (0, b3].

  Returns:
    An optax schedule of the update count, for ``ademamix(b3=...)``.

  Example:
    >>> import jadam
    >>> b3 = jadam.contrib.ademamix_b3_schedule(0.9999, 1000)

  References:
    Pagliardini et al., ICLR 2025 (arXiv:2409.03137), Section 3.
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
    groups: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """AdEMAMix with decoupled weight decay; keywords as optax.contrib.ademamix.

  The update is ``−lr·((m̂1 + α·m2)/(√v̂ + ε) + λ·θ)``.

  Args:
    learning_rate: the step size, a float, a jax scalar or an optax schedule.
    b1, b2, b3, alpha, eps, eps_root, mu_dtype, nu_dtype: see
      ``scale_by_ademamix``.
    weight_decay: λ, >= 0.
    mask: where the decay applies, as in ``jadam.adamw``.
    groups: parameter groups, as in ``jadam.adam``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import optax, jadam
    >>> b3 = jadam.contrib.ademamix_b3_schedule(0.9999, 1000)
    >>> alpha = optax.linear_schedule(0.0, 5.0, 1000)
    >>> opt = jadam.contrib.ademamix(1e-3, b3=b3, alpha=alpha)

  References:
    Pagliardini et al., "The AdEMAMix Optimizer", ICLR 2025 (arXiv:2409.03137).
  """
  make = lambda b1=b1, b2=b2, eps=eps: _spec(b1, b2, b3, alpha, eps,
                                             eps_root, mu_dtype, nu_dtype)
  return _alias.optimizer(
      _engine.build(make()), learning_rate, weight_decay, mask,
      groups=groups, make=make, defaults=dict(b1=b1, b2=b2, eps=eps))

"""ADOPT (Taniguchi et al., NeurIPS 2024): Adam normalising g_t by the
previous second moment; a per-array step on ``jadam._engine``."""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import optax

from jadam import _alias
from jadam import _engine
from jadam import _rule
from jadam import _transform
from jadam import _validation

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]


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

  As v_{t-1} does not contain g_t, it converges for any β2.

  Args:
    b1, b2: decays of the first and second moment, in [0, 1).
    eps: floor of √v in the normalisation, >= 0.
    mu_dtype, nu_dtype: storage of m and v, as in ``jadam.scale_by_adam``.
    nesterov: return ``β1·m_t + (1 − β1)·ĝ_t`` (look-ahead) instead of m_t.
    use_clipping: clip the normalised gradient (the authors' default).
    clip_value_fn: the clipping bound as a function of the update count t.

  Returns:
    An ``optax.GradientTransformation`` with a ``jadam.ScaleByAdamState``.

  Example:
    >>> import jax.numpy as jnp, jadam
    >>> tx = jadam.contrib.scale_by_adopt()
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> out, state = tx.update({"w": jnp.array([3., -4.])}, state)
    >>> out["w"]  # the first call only measures v_0
    Array([0., 0.], dtype=float32)

  References:
    Taniguchi et al., "ADOPT: Modified Adam Can Converge with Any β2 with the
    Optimal Rate", NeurIPS 2024.
  """
  return _engine.build(_spec(b1, b2, eps, mu_dtype, nesterov, use_clipping,
                             clip_value_fn, nu_dtype))


def _spec(b1, b2, eps, mu_dtype, nesterov, use_clipping, clip_value_fn,
          nu_dtype) -> _engine.Spec:
  """``scale_by_adopt``'s engine ``Spec``."""
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
    # v is bounded by G² as Adam's; m (g/√v averaged) is not: exact maxima.
    _, g_nu = g_max
    return (None, None if g_nu is None
            else _rule.ema(g_nu * g_nu, old[1], s["b2_t"]))

  def rule(state, t, skip):
    first = state.count == 0
    # The first call sets v_0 = g_0² and leaves m at zero (decays 0 and 1).
    scalars = dict(t=t, skip=skip, b1_t=jnp.where(first, 1.0, b1),
                   b2_t=jnp.where(first, 0.0, b2), eps=eps,
                   bound=clip_value_fn(state.count) if use_clipping else None)
    return _rule.LeafRule(step, (False, True), bounds, scalars=scalars,
                          second_moment=second_moment)

  def second_moment(new, s):
    # The next step divides by max(√v_t, ε): ε-dominated where √v_t < ε.
    return new[1], s["eps"]

  return _engine.Spec(
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
    groups: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """ADOPT (Taniguchi et al., 2024); same keywords as ``optax.contrib.adopt``.

  Args:
    learning_rate: α, a float, a jax scalar or an optax schedule.
    b1, b2, eps, mu_dtype, nesterov, use_clipping, clip_value_fn, nu_dtype:
      see ``scale_by_adopt``.
    weight_decay: optional decoupled weight decay λ (``−α·λ·θ``).
    mask: where the decay applies, as in ``jadam.adamw``.
    groups: parameter groups, as in ``jadam.adam`` (``weight_decay`` per
      group needs ``weight_decay`` given here).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jadam
    >>> opt = jadam.contrib.adopt(1e-3)

  References:
    Taniguchi et al., "ADOPT", NeurIPS 2024 (arXiv:2411.02853).
  """
  rest = (mu_dtype, nesterov, use_clipping, clip_value_fn, nu_dtype)
  return _alias.optimizer(
      _engine.build(_spec(b1, b2, eps, *rest)), learning_rate, weight_decay,
      mask, groups=groups,
      make=lambda b1=b1, b2=b2, eps=eps: _spec(b1, b2, eps, *rest),
      defaults=dict(b1=b1, b2=b2, eps=eps))

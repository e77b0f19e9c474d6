"""The Adam family's ``scale_by_*``: ``AdamRule`` flags over the engine.

States are optax's own classes (an int8 moment is an ``Int8Moment`` leaf),
so tree structures match optax's and float checkpoints move between them.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import optax

from jadam import _engine
from jadam import _formats
from jadam import _rule
from jadam import _validation

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

ScaleByAdamState = optax.ScaleByAdamState
ScaleByAmsgradState = optax.ScaleByAmsgradState

ADAM_MOMENTS = (_engine.Moment("mu"), _engine.Moment("nu", second=True))
AMSGRAD_MOMENTS = ADAM_MOMENTS + (
    _engine.Moment("nu_max", second=True, monotone=True),)


def check_rule(rule: _rule.AdamRule) -> None:
  _validation.check_decay("b1", rule.b1)
  _validation.check_decay("b2", rule.b2)
  _validation.check_nonnegative("eps", rule.eps)
  _validation.check_nonnegative("eps_root", rule.eps_root)
  if rule.rectify_threshold is not None:
    _validation.check_nonnegative("threshold", rule.rectify_threshold)
  if rule.numerics not in _rule.NUMERICS:
    raise ValueError(f"numerics must be one of {_rule.NUMERICS}, got "
                     f"{rule.numerics!r}.")
  if rule.numerics == "keras" and rule.nesterov:
    raise ValueError(
        "numerics='keras' reproduces keras.optimizers.Adam and AdamW, which "
        "have no Nesterov form; use nesterov=True with numerics='optax'.")
  if rule.numerics == "keras" and not (rule.bias_correction_mu
                                       and rule.bias_correction_nu):
    raise ValueError(
        "numerics='keras' always corrects both moments' bias (Keras folds "
        "the corrections into the step size); use numerics='optax' to turn "
        "bias_correction_mu or bias_correction_nu off.")
  if rule.numerics == "keras" and (rule.infinity_norm
                                   or rule.rectify_threshold is not None):
    raise ValueError(
        "numerics='keras' reproduces keras.optimizers.Adam and AdamW (and "
        "AMSGrad); AdaMax and RAdam take numerics='optax'.")


def formats(mu_dtype: Any, nu_dtype: Any, n: int = 2) -> tuple:
  """The storage formats of (m, v), or of (m, v, max v̂) for ``n=3``."""
  nu = _formats.as_format("nu_dtype", nu_dtype)
  return (_formats.as_format("mu_dtype", mu_dtype), nu, nu)[:n]


def spec(rule: _rule.AdamRule, mu_dtype: Any, nu_dtype: Any) -> _engine.Spec:
  """The engine's ``Spec`` of ``rule``, with optax's state class."""
  check_rule(rule)
  leaf_rule = lambda state, t, skip: _rule.leaf_rule(rule, t, skip)
  if rule.amsgrad:
    return _engine.Spec(ScaleByAmsgradState, AMSGRAD_MOMENTS,
                        formats(mu_dtype, nu_dtype, 3), leaf_rule)
  return _engine.Spec(ScaleByAdamState, ADAM_MOMENTS,
                      formats(mu_dtype, nu_dtype), leaf_rule)


def maker(rule: _rule.AdamRule, mu_dtype: Any, nu_dtype: Any):
  """``spec`` of ``rule`` with some of b1, b2 and eps replaced: what
  parameter groups build one group's step from."""
  return lambda **hyper: spec(rule._replace(**hyper), mu_dtype, nu_dtype)


def scale_by_rule(rule: _rule.AdamRule, mu_dtype: Any,
                   nu_dtype: Any) -> optax.GradientTransformationExtraArgs:
  return _engine.build(spec(rule, mu_dtype, nu_dtype))


def scale_by_adam(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: Optional[Any] = None,
    *,
    nu_dtype: Optional[Any] = None,
    nesterov: bool = False,
    cautious: bool = False,
    numerics: str = "optax",
) -> optax.GradientTransformationExtraArgs:
  """Rescale gradients by Adam's bias-corrected moments.

  Returns the direction ``m̂_t / (√(v̂_t + eps_root) + eps)``; chain it with
  ``optax.scale_by_learning_rate`` (or use ``jadam.adam``).

  Args:
    b1: decay of the first moment, in [0, 1).
    b2: decay of the second moment, in [0, 1).
    eps: added to the denominator, >= 0.
    eps_root: added to v̂ inside the square root, >= 0.
    mu_dtype: storage of the first moment (None: the parameter's dtype).
    nu_dtype: storage of the second moment (None: the parameter's dtype);
      the arithmetic runs in float32 or wider whatever the storage.
    nesterov: Nesterov momentum (NAdam, Dozat 2016).
    cautious: drop the components whose sign disagrees with the gradient,
      rescaling the rest, per array (Cautious Adam, Liang et al. 2024).
    numerics: ``"optax"`` (equal to ``optax.adam``) or ``"keras"`` (as
      ``keras.optimizers.Adam`` rounds it; Keras' default ε is 1e-7).

  Returns:
    A ``GradientTransformationExtraArgs`` with state ``ScaleByAdamState``.
    ``update`` accepts ``jadam_skip``, a bool scalar: where True the step is
    skipped (zero direction, count and moments unchanged) in the same pass.

  Raises:
    ValueError: at construction, for an argument out of range.

  Example:
    >>> import jax.numpy as jnp, optax, jadam
    >>> tx = optax.chain(jadam.scale_by_adam(),
    ...                  optax.scale_by_learning_rate(1e-3))
    >>> state = tx.init({"w": jnp.ones(3)})
    >>> updates, state = tx.update({"w": jnp.array([1., -2., 0.])}, state)
    >>> updates["w"]
    Array([-0.00099999,  0.00099999, -0.        ], dtype=float32)

  References:
    Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.
  """
  return scale_by_rule(
      _rule.AdamRule(b1, b2, eps, eps_root, nesterov=nesterov,
                     cautious=cautious, numerics=numerics),
      mu_dtype, nu_dtype)


def scale_by_amsgrad(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: Optional[Any] = None,
    bias_correction_mu: bool = True,
    bias_correction_nu: bool = True,
    *,
    nu_dtype: Optional[Any] = None,
    cautious: bool = False,
    numerics: str = "optax",
) -> optax.GradientTransformationExtraArgs:
  """Adam dividing by the running maximum of the bias-corrected v̂.

  Args:
    b1, b2, eps, eps_root, mu_dtype, nu_dtype, cautious: as in
      ``scale_by_adam``; ``nu_dtype`` also stores the running maximum.
    bias_correction_mu: divide m_t by 1 − β1^t.
    bias_correction_nu: divide v_t by 1 − β2^t before the maximum.
    numerics: as in ``scale_by_adam``; ``"keras"`` takes the maximum of the
      uncorrected v_t, as ``keras.optimizers.Adam(amsgrad=True)`` does.

  Returns:
    A ``GradientTransformationExtraArgs`` with state ``ScaleByAmsgradState``
    (``jadam_skip`` as in ``scale_by_adam``).

  Example:
    >>> import jadam
    >>> tx = jadam.scale_by_amsgrad(b2=0.99)

  References:
    Reddi, Kale & Kumar, "On the Convergence of Adam and Beyond", ICLR 2018.
  """
  return scale_by_rule(
      _rule.AdamRule(b1, b2, eps, eps_root, amsgrad=True, cautious=cautious,
                     numerics=numerics, bias_correction_mu=bias_correction_mu,
                     bias_correction_nu=bias_correction_nu),
      mu_dtype, nu_dtype)


def scale_by_adamax(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    *,
    mu_dtype: Optional[Any] = None,
    nu_dtype: Optional[Any] = None,
    cautious: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """AdaMax: Adam with the infinity norm u_t = max(β2·u_{t-1}, |g_t| + ε).

  Args:
    b1, b2, eps, mu_dtype, nu_dtype, cautious: as in ``scale_by_adam``.

  Returns:
    A ``GradientTransformationExtraArgs`` with state ``ScaleByAdamState``,
    whose ``nu`` holds u (``jadam_skip`` as in ``scale_by_adam``).

  Example:
    >>> import jadam
    >>> tx = jadam.scale_by_adamax()

  References:
    Kingma & Ba (2015), Section 7.1 and Algorithm 2.
  """
  return scale_by_rule(
      _rule.AdamRule(b1, b2, eps, infinity_norm=True, cautious=cautious),
      mu_dtype, nu_dtype)


def scale_by_radam(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    threshold: ArrayLike = 5.0,
    *,
    nesterov: bool = False,
    mu_dtype: Optional[Any] = None,
    nu_dtype: Optional[Any] = None,
    cautious: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """RAdam: Adam with the variance of the adaptive step rectified.

  Args:
    b1, b2, eps, eps_root, nesterov, mu_dtype, nu_dtype, cautious: as in
      ``scale_by_adam``.
    threshold: while the SMA length ρ_t is below it, take momentum steps.

  Returns:
    A ``GradientTransformationExtraArgs`` with state ``ScaleByAdamState``
    (``jadam_skip`` as in ``scale_by_adam``).

  Example:
    >>> import jadam
    >>> tx = jadam.scale_by_radam(threshold=5.0)

  References:
    Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond",
    ICLR 2020.
  """
  return scale_by_rule(
      _rule.AdamRule(b1, b2, eps, eps_root, nesterov=nesterov,
                     rectify_threshold=threshold, cautious=cautious),
      mu_dtype, nu_dtype)

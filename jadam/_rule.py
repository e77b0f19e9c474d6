"""The Adam rule on one array: the only place Adam's arithmetic lives.

Kingma & Ba (2015), "Adam: A Method for Stochastic Optimization",
Algorithm 1; the code marks each line it implements::

    m_t = β1·m_{t-1} + (1 − β1)·g_t           # line 7
    v_t = β2·v_{t-1} + (1 − β2)·g_t²          # line 8
    m̂_t = m_t / (1 − β1^t)                    # line 9
    v̂_t = v_t / (1 − β2^t)                    # line 10
    θ_t = θ_{t-1} − α·m̂_t / (√v̂_t + ε)        # line 11

``adam_step`` returns the direction m̂_t / (√(v̂_t + ε_root) + ε); the −α is
left to ``optax.scale_by_learning_rate`` so that schedules, clipping and
weight decay compose around it. Variants are ``AdamRule`` flags.
"""

from __future__ import annotations

import functools
from typing import Callable, Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jadam import _skip

Array = jax.Array
ArrayLike = jax.typing.ArrayLike


class AdamRule(NamedTuple):
  """Hyperparameters and flags selecting one member of the Adam family.

  Attributes:
    b1: β1, decay of the first moment.
    b2: β2, decay of the second moment (of u_t for AdaMax).
    eps: ε, added to the denominator.
    eps_root: added to v̂ under the root (finite meta-gradients at v̂ = 0).
    nesterov: NAdam's look-ahead first moment (Dozat, 2016).
    amsgrad: divide by the running maximum of v̂ (Reddi et al., 2018).
    infinity_norm: AdaMax, u_t = max(β2·u_{t-1}, |g_t| + ε) replaces v_t
      (Kingma & Ba, 2015, Algorithm 2).
    rectify_threshold: RAdam's rectification (Liu et al., 2020): momentum
      steps while ρ_t is below it; None turns it off.
    cautious: keep the components agreeing in sign with g_t, rescaled by
      the fraction kept (Liang et al., 2024).
    numerics: ``"optax"`` (Algorithm 1 as written) or ``"keras"`` (as
      ``keras.optimizers.Adam`` rounds it, so ported models match).
    bias_correction_mu: divide m_t by 1 − β1^t (line 9).
    bias_correction_nu: divide v_t by 1 − β2^t (line 10).
  """

  b1: ArrayLike = 0.9
  b2: ArrayLike = 0.999
  eps: ArrayLike = 1e-8
  eps_root: ArrayLike = 0.0
  nesterov: bool = False
  amsgrad: bool = False
  infinity_norm: bool = False
  rectify_threshold: Optional[ArrayLike] = None
  cautious: bool = False
  numerics: Literal["optax", "keras"] = "optax"
  bias_correction_mu: bool = True
  bias_correction_nu: bool = True


NUMERICS = ("optax", "keras")

# Floor of a cautious step's kept fraction: no 1/0 when every sign disagrees.
CAUTIOUS_MIN_KEPT = 1e-3


class Moments(NamedTuple):
  """The per-array optimizer memory, in the compute dtype.

  Attributes:
    mu: m, the first moment (the gradient's dtype, complex included).
    nu: v, the second moment of |g| (real), or u for AdaMax.
    nu_max: AMSGrad's running maximum of v̂, else None.
  """

  mu: Array
  nu: Array
  nu_max: Optional[Array] = None


def abs_sq(g: Array) -> Array:
  """|g|², real for complex g."""
  if jnp.iscomplexobj(g):
    return jnp.real(g * jnp.conj(g))
  return g * g


def ema(new: Array, old: Array, decay: ArrayLike,
        skip: Optional[Array] = None) -> Array:
  """``decay·old + (1 − decay)·new``; exactly ``old`` where ``skip`` (then
  ``new`` may be anything, NaN included)."""
  return hold(skip, (1 - decay) * new + decay * old, old)


def hold(skip: Optional[Array], new: Optional[Array],
         old: Optional[Array]) -> Optional[Array]:
  """``old`` where ``skip``, else ``new``: selecting where each value is
  computed keeps a skipped step inside the step's own pass."""
  if skip is None or new is None:
    return new
  return jnp.where(skip, old, new)


@functools.partial(jax.jit, inline=True)
def bias_correction(decay: ArrayLike, t: Array) -> Array:
  """``1 − decay^t``, jitted (inlined under an outer jit) as optax does, so
  that an eager update rounds as a jitted one; op by op it would not."""
  return 1 - decay**t


class Corrections(NamedTuple):
  """``1 − β1^t``, ``1 − β2^t`` (and Nesterov's ``1 − β1^(t+1)``), shared
  by every leaf as in optax: XLA turns a division by a scalar computed per
  leaf into a multiply by its reciprocal, which rounds differently."""

  mu: Array
  nu: Array
  mu_next: Optional[Array] = None


def corrections(b1: ArrayLike, b2: ArrayLike, t: Array,
                nesterov: bool = False) -> Corrections:
  """Step ``t``'s ``Corrections`` (Nesterov's t + 1 saturates as t does)."""
  mu_next = None
  if nesterov:
    t_next = jnp.where(t < jnp.iinfo(jnp.int32).max, t + 1, t)
    mu_next = bias_correction(b1, t_next)
  return Corrections(bias_correction(b1, t), bias_correction(b2, t), mu_next)


class LeafRule(NamedTuple):
  """One optimizer's step on one array, as the engine (``_engine``) runs it.

  Attributes:
    step: ``(g, moments, scalars) -> (direction, moments)``, compute dtype;
      bitwise the old moments where ``scalars["skip"]`` (use ``hold``).
    real: per moment, a moment of |g|² (real; √v in float16 and int8).
    bounds: None, or ``(g_max, old_scales, scalars)`` -> per int8 moment a
      bound of its new block maxima (None: take the exact maxima).
    cautious: apply ``caution`` to the direction.
    scalars: this call's values (``"t"``, ``"skip"``, ...), read from the
      argument, never a closure: one traced outside ``auto_axes`` is
      invalid inside it.
    monotone: per moment, a running maximum rounding must not lower.
    second_moment: None, or ``(new_moments, scalars) -> (v̂, ε)``: the
      estimate of E[g²] whose root, plus ε, divides the step, for the
      numerics doctor (``jadam.doctor``) to compare with ε and g².
  """

  step: Callable[[Array, tuple, dict], tuple[Array, tuple]]
  real: tuple[bool, ...]
  bounds: Optional[Callable[[tuple, tuple, dict], tuple]] = None
  cautious: bool = False
  scalars: Optional[dict] = None
  monotone: tuple[bool, ...] = ()
  second_moment: Optional[Callable[[tuple, dict], tuple]] = None

  @property
  def skip(self) -> Optional[Array]:
    """The traced bool of a skipped step, or None."""
    return (self.scalars or {}).get("skip")

  def direction(self, raw: Array, g: Array) -> Array:
    """``step``'s direction, masked if cautious, zero on a skipped step."""
    if self.cautious:
      raw = caution(raw, g)
    return _skip.zero_if(self.skip, raw)


def split_scalars(leaf: LeafRule) -> tuple[list, Callable[[list], LeafRule]]:
  """``leaf``'s traced scalars, and a function rebuilding ``leaf`` from new
  ones: to pass them as arguments through ``jax.jit`` or ``auto_axes``.
  Python numbers stay static, so they round as without the boundary."""
  values, treedef = jax.tree.flatten(leaf.scalars)
  traced = [isinstance(x, jax.Array) for x in values]

  def rebuild(arrays):
    arrays = iter(arrays)
    return leaf._replace(scalars=treedef.unflatten(
        [next(arrays) if is_array else x
         for x, is_array in zip(values, traced)]))

  return [x for x, is_array in zip(values, traced) if is_array], rebuild


def leaf_rule(rule: AdamRule, t: Array, skip: Optional[Array] = None
              ) -> LeafRule:
  """The Adam family's ``LeafRule``: moments (m, v), or (m, v, max v̂)."""
  n = 3 if rule.amsgrad else 2
  shared = None
  if rule.numerics != "keras":
    shared = corrections(rule.b1, rule.b2, t, rule.nesterov)

  def step(g, moments, s):
    direction, new = _step(g, Moments(*moments), s["t"], s["rule"],
                           s["skip"], s["corrections"])
    return direction, tuple(new)[:n]

  def bounds(g_max, old, s):
    return scale_bounds(s["rule"], s["t"], g_max, old, s["corrections"])

  return LeafRule(step, real=(False, True, True)[:n], bounds=bounds,
                  cautious=rule.cautious,
                  scalars={"t": t, "skip": skip, "rule": rule,
                           "corrections": shared},
                  monotone=(False, False, True)[:n],
                  second_moment=second_moment)


def second_moment(new: tuple, s: dict) -> tuple[Array, ArrayLike]:
  """The Adam family's (v̂, ε) after a step: the v̂ line 11 divides by
  (AMSGrad's running maximum; AdaMax's u², whose root is u)."""
  rule = s["rule"]
  if rule.infinity_norm:
    return new[1] * new[1], rule.eps
  if rule.amsgrad:
    return new[2] + rule.eps_root, rule.eps
  v = new[1]
  if rule.bias_correction_nu:
    c = _corrections(rule, s["t"], s["corrections"])
    v = v / c.nu.astype(v.dtype)
  return v + rule.eps_root, rule.eps


def scale_bounds(rule: AdamRule, t: Array, g_max: tuple, old: tuple,
                 shared: Optional["Corrections"] = None) -> tuple:
  """Upper bounds of the int8 moments' new block maxima (None where
  ``g_max`` is), from a block's old bound S and largest finite |g|, G, by
  the rule's own recurrences and rounding so none falls below its moment:
  |m| <= β1·S_m + (1 − β1)·G (either form of m), v <= β2·S_v + (1 − β2)·G²,
  AdaMax u <= max(β2·S_u, G + ε), AMSGrad max v̂ <= max(S_max, the v bound
  / (1 − β2^t)) (Keras: undivided)."""
  out = []
  for k, G in enumerate(g_max):
    if G is None:
      out.append(None)
      continue
    if k == 0:
      bound = ema(G, old[0], rule.b1)
    elif k == 1 and rule.infinity_norm:
      # ε per position (parameter groups on a flat buffer): its largest.
      eps = rule.eps if jnp.ndim(rule.eps) == 0 else jnp.max(rule.eps)
      bound = jnp.maximum(G + eps, rule.b2 * old[1])
    elif k == 1:
      bound = ema(G * G, old[1], rule.b2)
    else:
      bound = ema(G * G, old[1], rule.b2)
      if rule.numerics != "keras" and rule.bias_correction_nu:
        bound = bound / _corrections(rule, t, shared).nu.astype(
            bound.dtype)
      bound = jnp.maximum(old[2], bound)
    out.append(bound)
  return tuple(out)


def denominator(v_hat: Array, rule: AdamRule) -> Array:
  """``√(v̂_t + ε_root) + ε``, the divisor of line 11."""
  return jnp.sqrt(v_hat + rule.eps_root) + rule.eps


def adam_step(
    g: Array, moments: Moments, t: Array, rule: AdamRule,
    skip: Optional[Array] = None,
) -> tuple[Array, Moments]:
  """One step of Algorithm 1 (Kingma & Ba, 2015) on one array.

  Args:
    g: the gradient g_t, in the compute dtype (float32 or wider).
    moments: m_{t-1}, v_{t-1} (and max v̂ for AMSGrad), compute dtype.
    t: the step number, 1 at the first update (int32 scalar).
    rule: hyperparameters and variant flags.
    skip: None, or a bool: where True, zero direction, moments unchanged.

  Returns:
    ``(direction, new_moments)``; the update is ``−α·direction``.
  """
  direction, new = _step(g, moments, t, rule, skip)
  if rule.cautious:
    direction = caution(direction, g)
  return _skip.zero_if(skip, direction), new


def _step(g: Array, moments: Moments, t: Array, rule: AdamRule,
          skip: Optional[Array] = None,
          shared: Optional["Corrections"] = None) -> tuple[Array, Moments]:
  """``adam_step`` without the cautious mask."""
  if rule.numerics == "keras":
    return _keras_step(g, moments, t, rule, skip)
  b1, b2, eps = rule.b1, rule.b2, rule.eps
  c = _corrections(rule, t, shared)
  m = ema(g, moments.mu, b1, skip)                                # line 7
  if rule.infinity_norm:
    # Algorithm 2, with ε inside the max as optax does: u_t > 0.
    v = hold(skip, jnp.maximum(jnp.abs(g) + eps, b2 * moments.nu),
              moments.nu)
  else:
    v = ema(abs_sq(g), moments.nu, b2, skip)                      # line 8
  if rule.nesterov:
    # Dozat (2016): β1·m̂_{t+1} + (1 − β1)·ĝ_t.
    m_hat = (b1 * (m / c.mu_next.astype(m.dtype))
             + (1 - b1) * (g / c.mu.astype(g.dtype)))
  elif rule.bias_correction_mu:
    m_hat = m / c.mu.astype(m.dtype)                              # line 9
  else:
    m_hat = m
  if rule.infinity_norm:
    return m_hat / v, Moments(m, v)                               # Alg. 2
  v_hat = (v / c.nu.astype(v.dtype)                               # line 10
           if rule.bias_correction_nu else v)
  nu_max = None
  if rule.amsgrad:
    nu_max = hold(skip, jnp.maximum(moments.nu_max, v_hat), moments.nu_max)
    v_hat = nu_max
  if rule.rectify_threshold is not None:
    direction = _rectify(m_hat, denominator(v_hat, rule), t, b2,
                         rule.rectify_threshold)
  else:
    direction = m_hat / denominator(v_hat, rule)                  # line 11
  return direction, Moments(m, v, nu_max)


def _corrections(rule: AdamRule, t: Array,
                 shared: Optional[Corrections]) -> Corrections:
  """The update's ``shared`` corrections, or step ``t``'s own."""
  if shared is not None:
    return shared
  return corrections(rule.b1, rule.b2, t, rule.nesterov)


def _rectify(m_hat: Array, denominator_: Array, t: Array, b2: ArrayLike,
             threshold: ArrayLike) -> Array:
  """RAdam (Liu et al., 2020, Algorithm 2): ``r_t·m̂_t / denominator``,
  rounded in optax's order; plain momentum m̂_t while the SMA length ρ_t is
  below ``threshold`` (the variance of v̂ is then intractable)."""
  rho_inf = 2 / (1 - b2) - 1
  b2_t = b2**t
  rho = rho_inf - 2 * t * b2_t / (1 - b2_t)
  r = jnp.sqrt((rho - 4) * (rho - 2) * rho_inf
               / ((rho_inf - 4) * (rho_inf - 2) * rho))
  return jnp.where(rho >= threshold,
                   r.astype(m_hat.dtype) * m_hat / denominator_, m_hat)


def caution(direction: Array, g: Array) -> Array:
  """Cautious step (Liang et al., 2024): keep the components going downhill
  on g_t (``direction·g > 0``), divided by the fraction kept over the whole
  array, as the authors' code does, to keep the step's size."""
  if jnp.iscomplexobj(direction):
    agree = jnp.real(direction * jnp.conj(g)) > 0
  else:
    agree = direction * g > 0
  mask = agree.astype(jnp.finfo(direction.dtype).dtype)
  kept = jnp.maximum(jnp.mean(mask), CAUTIOUS_MIN_KEPT)
  return direction * (mask / kept)


def _keras_step(g: Array, moments: Moments, t: Array, rule: AdamRule,
                skip: Optional[Array]) -> tuple[Array, Moments]:
  """Algorithm 1 as ``keras.optimizers.Adam`` (Keras 3) rounds it, so that a
  ported model follows the same trajectory: bias corrections folded into the
  step size (Kingma & Ba, end of Section 2), ε̂ added to √v_t, ``m += (g −
  m)·(1 − β1)``, β to a float power, AMSGrad's maximum of the raw v_t."""
  b1, b2 = rule.b1, rule.b2
  m = hold(skip, moments.mu + (g - moments.mu) * (1 - b1),
           moments.mu)                                            # line 7
  v = hold(skip, moments.nu + (abs_sq(g) - moments.nu) * (1 - b2),
           moments.nu)                                            # line 8
  nu_max = None
  v_used = v
  if rule.amsgrad:
    nu_max = hold(skip, jnp.maximum(moments.nu_max, v), moments.nu_max)
    v_used = nu_max
  t_float = t.astype(v.dtype)
  step_size = (jnp.sqrt(bias_correction(b2, t_float))
               / bias_correction(b1, t_float))                    # lines 9-10
  direction = m * step_size.astype(m.dtype) / denominator(v_used, rule)
  return direction, Moments(m, v, nu_max)                         # line 11

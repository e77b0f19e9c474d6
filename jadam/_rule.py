"""The Adam rule on one array, and nothing else.

This module is the single home of Adam's arithmetic. Everything else in jadam
(the pytree transformation, the aliases, the flat fast path, compressed moment
storage, sharded state) decides *where* the arrays live and *how* they are
stored, then calls :func:`adam_step` on plain arrays in the compute dtype.

Notation follows Kingma & Ba (2015), "Adam: A Method for Stochastic
Optimization", Algorithm 1::

    m_t = β1·m_{t-1} + (1 − β1)·g_t           # line 7: first moment
    v_t = β2·v_{t-1} + (1 − β2)·g_t²          # line 8: second moment
    m̂_t = m_t / (1 − β1^t)                    # line 9: bias correction
    v̂_t = v_t / (1 − β2^t)                    # line 10
    θ_t = θ_{t-1} − α·m̂_t / (√v̂_t + ε)        # line 11

:func:`adam_step` returns the direction ``m̂_t / (√(v̂_t + ε_root) + ε)``;
multiplying by ``−α`` is left to ``optax.scale_by_learning_rate`` so that
schedules, clipping and weight decay compose around it.

The family members are flags on :class:`AdamRule`:

* ``nesterov``: NAdam, Dozat (2016): the first moment looks one step ahead.
* ``amsgrad``: Reddi et al. (2018): divide by the running maximum of v̂.
* ``infinity_norm``: AdaMax, Kingma & Ba (2015) Algorithm 2: u_t replaces v_t.
* ``rectify_threshold``: RAdam, Liu et al. (2020): variance rectification.
* ``cautious``: Liang et al. (2024): drop the components of the step whose
  sign disagrees with g_t, and rescale by the fraction kept.
* ``numerics="keras"``: the same algorithm with ``keras.optimizers.Adam``'s
  rounding: ε added to √v_t (not √v̂_t) and bias correction folded into the
  step size, so that a model ported from Keras trains identically.
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
  """Hyperparameters and flags that select one member of the Adam family.

  Attributes:
    b1: β1, decay of the first moment.
    b2: β2, decay of the second moment (of the infinity norm for AdaMax).
    eps: ε, added to the denominator.
    eps_root: added to v̂ inside the square root (keeps the derivative of the
      update finite when v̂ is zero, for meta-learning).
    nesterov: use Nesterov momentum (NAdam).
    amsgrad: divide by the running maximum of v̂ (AMSGrad).
    infinity_norm: replace v_t by u_t = max(β2·u_{t-1}, |g_t| + ε) (AdaMax).
    rectify_threshold: if not None, apply RAdam's variance rectification and
      fall back to momentum SGD while ρ_t is below this threshold.
    cautious: zero the components of the direction whose sign disagrees with
      the gradient and divide the rest by the fraction kept (per array).
    numerics: ``"optax"`` (Algorithm 1 as written, as optax computes it) or
      ``"keras"`` (as ``keras.optimizers.Adam`` computes it; see
      :func:`_keras_step`).
    bias_correction_mu: divide m_t by 1 − β1^t (line 9); False uses m_t.
    bias_correction_nu: divide v_t by 1 − β2^t (line 10); False uses v_t.

  A static record: what changes per call (the step number, the skip
  decision, the bias corrections) travels beside it.
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

# Floor on the fraction of components a cautious step keeps, so that a step
# where (almost) every sign disagrees is not blown up by 1/0.
CAUTIOUS_MIN_KEPT = 1e-3


class Moments(NamedTuple):
  """The per-array optimizer memory, in the compute dtype.

  Attributes:
    mu: m, the first moment (same dtype as the gradient, complex included).
    nu: v, the second moment of |g| (real), or u for AdaMax.
    nu_max: max over time of v̂ (AMSGrad only, otherwise None).
  """

  mu: Array
  nu: Array
  nu_max: Optional[Array] = None


def abs_sq(g: Array) -> Array:
  """|g|², real for complex g (the second moment of a complex parameter)."""
  if jnp.iscomplexobj(g):
    return jnp.real(g * jnp.conj(g))
  return g * g


def ema(new: Array, old: Array, decay: ArrayLike,
        skip: Optional[Array] = None) -> Array:
  """Exponential moving average ``decay·old + (1 − decay)·new``.

  Where the traced bool ``skip`` is True the result is ``old`` exactly (for a
  skipped step; ``new`` may then be anything, NaN included).
  """
  return hold(skip, (1 - decay) * new + decay * old, old)


def hold(skip: Optional[Array], new: Optional[Array],
         old: Optional[Array]) -> Optional[Array]:
  """``old`` where ``skip`` (a skipped step), else ``new``. Selecting where
  each new value is computed, rather than between whole arrays afterwards,
  keeps a skipped step inside the step's own pass."""
  if skip is None or new is None:
    return new
  return jnp.where(skip, old, new)


@functools.partial(jax.jit, inline=True)
def bias_correction(decay: ArrayLike, t: Array) -> Array:
  """``1 − decay^t``: the mass an EMA started at zero has gathered by step t.

  Compiled as one function (inlined under an outer ``jit``), as optax does,
  so that an update run eagerly rounds exactly as the same update under
  ``jax.jit``; op by op, ``decay^t`` and the subtraction round differently.
  """
  return 1 - decay**t


class Corrections(NamedTuple):
  """The bias corrections of one update, computed once for every leaf.

  optax computes ``1 − β^t`` once per update and divides every leaf by that
  one scalar. XLA simplifies a division by a scalar shared between several
  leaves differently from one computed inside each leaf's step (there it
  turns ``m / (1 − β1^t)`` into a multiply by the reciprocal, and rounds
  otherwise), so sharing the scalar as optax does is what keeps jadam's
  jitted update bitwise equal to optax's on trees of several leaves.

  Attributes:
    mu: ``1 − β1^t``.
    nu: ``1 − β2^t``.
    mu_next: ``1 − β1^(t+1)`` (Nesterov's look-ahead), or None.
  """

  mu: Array
  nu: Array
  mu_next: Optional[Array] = None


def corrections(b1: ArrayLike, b2: ArrayLike, t: Array,
                nesterov: bool = False) -> Corrections:
  """The :class:`Corrections` of step ``t`` (``t + 1`` saturating as ``t``
  does, for Nesterov)."""
  mu_next = None
  if nesterov:
    t_next = jnp.where(t < jnp.iinfo(jnp.int32).max, t + 1, t)
    mu_next = bias_correction(b1, t_next)
  return Corrections(bias_correction(b1, t), bias_correction(b2, t), mu_next)


class LeafRule(NamedTuple):
  """One optimizer's step on one array, as the engine (:mod:`jadam._engine`)
  needs it: every optimizer of the package is one of these, and the engine
  owns storage formats, the in-pass skip, the CPU single-pass form, sharding
  and the random streams.

  Attributes:
    step: ``step(g, moments, scalars) -> (direction, new_moments)``: ``g``
      and the moments (a tuple, in the order of ``real``) in the compute
      dtype, and ``scalars`` as below; the raw direction (the engine applies
      the cautious mask and zeroes it on a skipped step). Where
      ``scalars["skip"]`` is True the new moments must equal the old ones
      bitwise (:func:`ema` and :func:`hold` take ``skip``).
    real: for each moment, whether it is a moment of |g|² (real for complex
      parameters, kept as √v in float16 and int8).
    bounds: None, or ``bounds(g_max, old_scales, scalars) -> tuple``: for
      each int8 moment, an upper bound of its new block maxima from
      ``g_max`` (the block's largest finite |g|, None for a moment that is
      not int8) and the block's old scales; None in the result where the
      recurrence gives no close bound (the engine then takes the new
      values' exact maxima).
    cautious: apply :func:`caution` to the direction.
    scalars: a dict of this call's values that ``step`` and ``bounds`` read
      (the step number ``"t"``, the skip decision ``"skip"``, traced
      hyperparameters, ...). ``step`` and ``bounds`` take them from their
      argument, never from a closure: the engine hands them through
      transformations such as ``jax.sharding.auto_axes``, inside which a
      value traced outside is not valid.
    monotone: for each moment, whether it is a running maximum that rounding
      must not lower (AMSGrad's).
  """

  step: Callable[[Array, tuple, dict], tuple[Array, tuple]]
  real: tuple[bool, ...]
  bounds: Optional[Callable[[tuple, tuple, dict], tuple]] = None
  cautious: bool = False
  scalars: Optional[dict] = None
  monotone: tuple[bool, ...] = ()

  @property
  def skip(self) -> Optional[Array]:
    """The traced bool of a skipped step, or None."""
    return (self.scalars or {}).get("skip")

  def direction(self, raw: Array, g: Array) -> Array:
    """The step's direction from ``step``'s: masked if cautious, zero on a
    skipped step."""
    if self.cautious:
      raw = caution(raw, g)
    return _skip.zero_if(self.skip, raw)


def split_scalars(leaf: LeafRule) -> tuple[list, Callable[[list], LeafRule]]:
  """``leaf``'s traced per-call values, and a function that rebuilds
  ``leaf`` from new ones.

  For handing ``leaf`` through a transformation (``jax.jit``,
  ``jax.sharding.auto_axes``) inside which values traced outside are not
  valid: pass the arrays as arguments and rebuild inside. Python numbers
  stay static, so that they round as they would without the boundary.
  """
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
  """The Adam family's :class:`LeafRule`: moments ``(m, v)``, or
  ``(m, v, max v̂)`` for AMSGrad, stepped by :func:`adam_step`'s rule."""
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
                  monotone=(False, False, True)[:n])


def scale_bounds(rule: AdamRule, t: Array, g_max: tuple, old: tuple,
                 shared: Optional["Corrections"] = None) -> tuple:
  """Upper bounds of the new block maxima of the Adam family's moments, from
  S, a block's old bound (itself above the old moment), and G, its largest
  finite |g|, by the rule's own recurrences (and decay factors, rounded as
  the rule rounds them, so that no rounding puts a bound below its moment):

  * m = β1·m + (1 − β1)·g, so |m| <= β1·S_m + (1 − β1)·G (Keras' form
    m + (g − m)(1 − β1) is the same number).
  * v = β2·v + (1 − β2)·|g|², so v <= β2·S_v + (1 − β2)·G².
  * AdaMax: u = max(β2·u, |g| + ε) <= max(β2·S_u, G + ε).
  * AMSGrad: max v̂ <= max(S_max, (β2·S_v + (1 − β2)·G²) / (1 − β2^t))
    (Keras keeps the maximum of v itself, without the division).

  By induction every stored value stays within its bound, and a bound is an
  average of past block maxima of the gradient (or of its square), which
  decays as the moment does.

  Args:
    rule: the Adam variant.
    t: the step number.
    g_max: per moment, G (float32 per block), or None if it is not int8.
    old: per moment, its old block scales.
    shared: this update's :class:`Corrections`, if computed once.

  Returns:
    Per moment, the bound (None where ``g_max`` is None).
  """
  out = []
  for k, G in enumerate(g_max):
    if G is None:
      out.append(None)
      continue
    if k == 0:
      bound = ema(G, old[0], rule.b1)
    elif k == 1 and rule.infinity_norm:
      bound = jnp.maximum(G + rule.eps, rule.b2 * old[1])
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
  """One step of Algorithm 1 on one array.

  Args:
    g: the gradient g_t, already in the compute dtype (float32 or wider).
    moments: m_{t-1}, v_{t-1} (and max v̂ for AMSGrad) in the compute dtype.
    t: the step number, counting from 1 for the first update (int32 scalar).
    rule: hyperparameters and variant flags.
    skip: None, or a bool that skips the step where True: the moments come
      back bitwise unchanged and the direction is zero, selected element by
      element where each is computed.

  Returns:
    ``(direction, new_moments)``: the direction is to be scaled by ``−α``.
  """
  direction, new = _step(g, moments, t, rule, skip)
  if rule.cautious:
    direction = caution(direction, g)
  return _skip.zero_if(skip, direction), new


def _step(g: Array, moments: Moments, t: Array, rule: AdamRule,
          skip: Optional[Array] = None,
          shared: Optional["Corrections"] = None) -> tuple[Array, Moments]:
  """:func:`adam_step` for one rule, without the cautious mask."""
  if rule.numerics == "keras":
    return _keras_step(g, moments, t, rule, skip)
  b1, b2, eps = rule.b1, rule.b2, rule.eps
  c = _corrections(rule, t, shared)
  m = ema(g, moments.mu, b1, skip)                                # line 7
  if rule.infinity_norm:
    # Algorithm 2: u_t = max(β2·u_{t-1}, |g_t|), with ε inside as optax does,
    # so that u_t > 0 and no separate ε is needed in the denominator.
    v = hold(skip, jnp.maximum(jnp.abs(g) + eps, b2 * moments.nu),
              moments.nu)
  else:
    v = ema(abs_sq(g), moments.nu, b2, skip)                      # line 8
  if rule.nesterov:
    # Dozat (2016): β1·m̂_{t+1} + (1 − β1)·ĝ_t, with t+1 saturating like t.
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
  """The update's ``shared`` :class:`Corrections`, or step ``t``'s own."""
  if shared is not None:
    return shared
  return corrections(rule.b1, rule.b2, t, rule.nesterov)


def _rectify(m_hat: Array, denominator_: Array, t: Array, b2: ArrayLike,
             threshold: ArrayLike) -> Array:
  """RAdam (Liu et al., 2020, Algorithm 2): ``r_t·m̂_t / denominator`` once
  ρ_t is large (in that order of rounding, optax's).

  While the approximated length of the SMA ρ_t is below ``threshold`` the
  variance of v̂ is intractable and the step is plain momentum, m̂_t.
  """
  rho_inf = 2 / (1 - b2) - 1
  b2_t = b2**t
  rho = rho_inf - 2 * t * b2_t / (1 - b2_t)
  r = jnp.sqrt((rho - 4) * (rho - 2) * rho_inf
               / ((rho_inf - 4) * (rho_inf - 2) * rho))
  return jnp.where(rho >= threshold,
                   r.astype(m_hat.dtype) * m_hat / denominator_, m_hat)


def caution(direction: Array, g: Array) -> Array:
  """Cautious step (Liang et al., 2024): keep what agrees in sign with g_t.

  A component moves only if the step goes downhill on the current gradient
  (``direction·g > 0``; the parameter moves by ``−α·direction``). The kept
  components are divided by the fraction kept, computed over the whole array,
  as the authors' reference code does, so the step's overall size is roughly
  preserved; the fraction is floored at ``CAUTIOUS_MIN_KEPT``.
  """
  if jnp.iscomplexobj(direction):
    agree = jnp.real(direction * jnp.conj(g)) > 0
  else:
    agree = direction * g > 0
  mask = agree.astype(jnp.finfo(direction.dtype).dtype)
  kept = jnp.maximum(jnp.mean(mask), CAUTIOUS_MIN_KEPT)
  return direction * (mask / kept)


def _keras_step(g: Array, moments: Moments, t: Array, rule: AdamRule,
                skip: Optional[Array]) -> tuple[Array, Moments]:
  """Algorithm 1 as ``keras.optimizers.Adam`` (Keras 3) computes it.

  Kingma & Ba (2015, end of Section 2) note that lines 9-11 may be rewritten
  with the bias corrections folded into the step size; Keras does that, so its
  ε is the paper's ε̂ and is added to √v_t rather than √v̂_t:

      α_t = α·√(1 − β2^t) / (1 − β1^t)
      θ_t = θ_{t-1} − α_t·m_t / (√v_t + ε̂)

  Keras also updates moments as ``m += (g − m)·(1 − β1)``, raises β to a float
  power, and for AMSGrad keeps the running maximum of the uncorrected v_t.
  Matching all of this, not just the formula, is what makes a ported model
  follow the same trajectory.
  """
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

"""Complete optimizers: a jadam scaling, optional weight decay, the step.

Keyword names and defaults are optax's: ``optax.adam`` → ``jadam.adam``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import optax

from jadam.sharding import _placement
from jadam import _groups
from jadam import _rule
from jadam import _transform
from jadam import _validation

ArrayLike = jax.typing.ArrayLike
ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]
MaskOrFn = Optional[Union[Any, Callable[[optax.Params], Any]]]


def optimizer(scaling: optax.GradientTransformation,
               learning_rate: ScalarOrSchedule,
               weight_decay: Optional[ScalarOrSchedule] = None,
               mask: MaskOrFn = None,
               numerics: str = "optax", *, groups: Any = None,
               make: Optional[Callable] = None,
               defaults: Optional[dict] = None,
               ) -> optax.GradientTransformationExtraArgs:
  """``scaling``, then decoupled weight decay if given, then ``−α``.

  With ``groups``, the same in one grouped pass (``_groups.grouped``), from
  ``make`` (the scaling's ``Spec`` with b1, b2, eps overridden) and the
  scaling's own ``defaults`` of them.
  """
  _validation.check_learning_rate(learning_rate)
  if weight_decay is not None:
    _validation.check_nonnegative("weight_decay", weight_decay,
                                  schedule=True)
  if groups is not None:
    if numerics != "optax":
      raise ValueError("groups take numerics='optax'.")
    return _groups.grouped(make, defaults, learning_rate, weight_decay,
                           groups, mask)
  parts = [scaling]
  if weight_decay is not None:
    if numerics == "keras":
      return _placement.placing_scalars(optax.chain(
          scaling, _keras_decay_then_step(learning_rate, weight_decay, mask)))
    parts.append(optax.add_decayed_weights(weight_decay, mask))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  # A schedule's step count is made by optax's init.
  return _placement.placing_scalars(optax.chain(*parts))


def _family(rule: _rule.AdamRule, mu_dtype: Any, nu_dtype: Any,
            learning_rate: ScalarOrSchedule,
            weight_decay: Optional[ScalarOrSchedule] = None,
            mask: MaskOrFn = None, groups: Any = None
            ) -> optax.GradientTransformationExtraArgs:
  """``optimizer`` of the Adam family's ``rule``."""
  return optimizer(
      _transform.scale_by_rule(rule, mu_dtype, nu_dtype), learning_rate,
      weight_decay, mask, rule.numerics, groups=groups,
      make=_transform.maker(rule, mu_dtype, nu_dtype),
      defaults=dict(b1=rule.b1, b2=rule.b2, eps=rule.eps))


def _keras_decay_then_step(
    learning_rate: ScalarOrSchedule, weight_decay: ScalarOrSchedule,
    mask: MaskOrFn) -> optax.GradientTransformation:
  """``θ ← θ − θ·λ·α``, then ``θ ← θ − α·d``, as keras.optimizers.AdamW.

  Same sum as ``−α·(d + λ·θ)``, but Keras's order rounds differently.
  """
  decay = optax.add_decayed_weights(weight_decay, mask)

  def init_fn(params):
    return decay.init(params), optax.ScaleByScheduleState(
        jnp.zeros([], jnp.int32))

  def update_fn(directions, state, params=None):
    if params is None:
      raise ValueError("numerics='keras' with weight decay needs the params: "
                       "call update(grads, state, params).")
    decay_state, schedule_state = state
    lr = (learning_rate(schedule_state.count) if callable(learning_rate)
          else learning_rate)
    # λ·θ where the mask allows decay, 0 elsewhere.
    decay_terms, decay_state = decay.update(
        jax.tree.map(jnp.zeros_like, directions), decay_state, params)
    new_params = jax.tree.map(lambda p, wd_p, d: (p - wd_p * lr) - lr * d,
                              params, decay_terms, directions)
    updates = jax.tree.map(lambda new, p: new - p, new_params, params)
    return updates, (decay_state, optax.ScaleByScheduleState(
        optax.safe_increment(schedule_state.count)))

  return optax.GradientTransformation(init_fn, update_fn)


def adam(
    learning_rate: ScalarOrSchedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: Optional[Any] = None,
    *,
    nesterov: bool = False,
    nu_dtype: Optional[Any] = None,
    cautious: bool = False,
    numerics: str = "optax",
    groups: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """The Adam optimizer (Kingma & Ba, 2015).

  Args:
    learning_rate: α, a float, a jax scalar or an optax schedule.
    b1, b2, eps, eps_root, mu_dtype, nu_dtype, nesterov, cautious, numerics:
      as in ``jadam.scale_by_adam``; ``numerics="keras"`` with ``eps=1e-7``
      matches ``keras.optimizers.Adam``.
    groups: parameter groups: a list of ``jadam.Group`` (matched on the
      parameters' key paths, first match wins) or a ``FlatView``'s
      ``view.groups``. Each group has its own learning rate, ε, β1, β2 (and
      weight decay where the optimizer has it) or is frozen, in one pass;
      the state is then ``(moments, jadam.GroupHyperparamsState)``. See
      docs/groups.md.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jadam
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> opt = jadam.adam(learning_rate=0.1)
    >>> grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
    >>> updates, _ = opt.update(grads, opt.init(params), params)
    >>> [round(float(w), 4) for w in optax.apply_updates(params, updates)["w"]]
    [0.9, -1.9]

  References:
    Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.
  """
  return _family(
      _rule.AdamRule(b1, b2, eps, eps_root, nesterov=nesterov,
                     cautious=cautious, numerics=numerics),
      mu_dtype, nu_dtype, learning_rate, groups=groups)


def adamw(
    learning_rate: ScalarOrSchedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: Optional[Any] = None,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: MaskOrFn = None,
    *,
    nesterov: bool = False,
    nu_dtype: Optional[Any] = None,
    cautious: bool = False,
    numerics: str = "optax",
    groups: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Adam with decoupled weight decay (Loshchilov & Hutter, 2019).

  The update is ``−α·(m̂/(√v̂ + ε) + λ·θ)``: unlike an L2 term in the loss,
  the decay bypasses the moments.

  Args:
    learning_rate, b1, b2, eps, eps_root, mu_dtype, nu_dtype, nesterov,
      cautious: as in ``adam``; the cautious mask leaves the decay alone.
    weight_decay: λ >= 0, a float or a schedule.
    mask: booleans with the parameters' structure (or a callable returning
      them), True where decay applies (not on biases, say).
    numerics: as in ``adam``; ``"keras"`` with ``eps=1e-7`` matches
      ``keras.optimizers.AdamW``, rounding included (decay first, then step).
    groups: parameter groups (a list of ``jadam.Group``, or a ``FlatView``'s
      ``view.groups``), as in ``adam``; exclusive with ``mask``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jadam
    >>> no_bias = lambda p: jax.tree_util.tree_map_with_path(
    ...     lambda path, _: "bias" not in jax.tree_util.keystr(path), p)
    >>> opt = jadam.adamw(1e-3, weight_decay=0.01, mask=no_bias)

  References:
    Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
  """
  return _family(
      _rule.AdamRule(b1, b2, eps, eps_root, nesterov=nesterov,
                     cautious=cautious, numerics=numerics),
      mu_dtype, nu_dtype, learning_rate, weight_decay, mask, groups)


def nadam(
    learning_rate: ScalarOrSchedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: Optional[Any] = None,
    *,
    nesterov: bool = True,
    nu_dtype: Optional[Any] = None,
    cautious: bool = False,
    groups: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Adam with Nesterov momentum: ``adam`` with ``nesterov=True``.

  Args:
    learning_rate, b1, b2, eps, eps_root, mu_dtype, nu_dtype, cautious,
      nesterov: as in ``adam``; ``nesterov=False`` gives plain Adam.
    groups: as in ``adam``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jadam
    >>> opt = jadam.nadam(1e-3)

  References:
    Dozat, "Incorporating Nesterov Momentum into Adam", ICLR workshop 2016.
  """
  return adam(learning_rate, b1, b2, eps, eps_root, mu_dtype,
              nesterov=nesterov, nu_dtype=nu_dtype, cautious=cautious,
              groups=groups)


def nadamw(
    learning_rate: ScalarOrSchedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: Optional[Any] = None,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: MaskOrFn = None,
    *,
    nesterov: bool = True,
    nu_dtype: Optional[Any] = None,
    cautious: bool = False,
    groups: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """NAdam with decoupled weight decay: ``adamw`` with ``nesterov=True``.

  Args:
    learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask,
      nu_dtype, cautious: as in ``adamw``; ``nesterov=False`` gives AdamW.
    groups: as in ``adam``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jadam
    >>> opt = jadam.nadamw(1e-3, weight_decay=0.01)

  References:
    Dozat, "Incorporating Nesterov Momentum into Adam", 2016; Loshchilov &
    Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
  """
  return adamw(learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay,
               mask, nesterov=nesterov, nu_dtype=nu_dtype, cautious=cautious,
               groups=groups)


def amsgrad(
    learning_rate: ScalarOrSchedule,
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
    groups: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """AMSGrad: Adam dividing by the running maximum of v̂.

  Args:
    learning_rate, b1, b2, eps, eps_root, mu_dtype, nu_dtype, cautious: as
      in ``adam``.
    bias_correction_mu, bias_correction_nu, numerics: as in
      ``jadam.scale_by_amsgrad``; ``numerics="keras"`` matches
      ``keras.optimizers.Adam(amsgrad=True)``.
    groups: as in ``adam``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jadam
    >>> opt = jadam.amsgrad(1e-3)

  References:
    Reddi, Kale & Kumar, "On the Convergence of Adam and Beyond", ICLR 2018.
  """
  return _family(
      _rule.AdamRule(b1, b2, eps, eps_root, amsgrad=True, cautious=cautious,
                     numerics=numerics, bias_correction_mu=bias_correction_mu,
                     bias_correction_nu=bias_correction_nu),
      mu_dtype, nu_dtype, learning_rate, groups=groups)


def adamax(
    learning_rate: ScalarOrSchedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    *,
    mu_dtype: Optional[Any] = None,
    nu_dtype: Optional[Any] = None,
    cautious: bool = False,
    groups: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """AdaMax: Adam with the infinity norm in place of v.

  Args:
    learning_rate, b1, b2, eps, mu_dtype, nu_dtype, cautious: as in ``adam``.
    groups: as in ``adam``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jadam
    >>> opt = jadam.adamax(2e-3)

  References:
    Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015,
    Section 7.1.
  """
  return _family(
      _rule.AdamRule(b1, b2, eps, infinity_norm=True, cautious=cautious),
      mu_dtype, nu_dtype, learning_rate, groups=groups)


def adamaxw(
    learning_rate: ScalarOrSchedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: MaskOrFn = None,
    *,
    mu_dtype: Optional[Any] = None,
    nu_dtype: Optional[Any] = None,
    cautious: bool = False,
    groups: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """AdaMax with decoupled weight decay.

  Args:
    learning_rate, b1, b2, eps, mu_dtype, nu_dtype, cautious: as in
      ``adamax``.
    weight_decay, mask: as in ``adamw``.
    groups: as in ``adam``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jadam
    >>> opt = jadam.adamaxw(2e-3, weight_decay=0.01)

  References:
    Kingma & Ba, "Adam", ICLR 2015, Section 7.1; Loshchilov & Hutter,
    "Decoupled Weight Decay Regularization", ICLR 2019.
  """
  return _family(
      _rule.AdamRule(b1, b2, eps, infinity_norm=True, cautious=cautious),
      mu_dtype, nu_dtype, learning_rate, weight_decay, mask, groups)


def radam(
    learning_rate: ScalarOrSchedule,
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
    groups: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """RAdam: Adam with the variance of its adaptive step rectified.

  Args:
    learning_rate, b1, b2, eps, eps_root, nesterov, mu_dtype, nu_dtype,
      cautious: as in ``adam``.
    threshold: as in ``jadam.scale_by_radam``.
    groups: as in ``adam``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jadam
    >>> opt = jadam.radam(1e-3)

  References:
    Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond",
    ICLR 2020.
  """
  return _family(
      _rule.AdamRule(b1, b2, eps, eps_root, nesterov=nesterov,
                     rectify_threshold=threshold, cautious=cautious),
      mu_dtype, nu_dtype, learning_rate, groups=groups)

"""Schedule-free AdamW (Defazio et al., NeurIPS 2024): optax's schedule-free
wrapper around an Adam step without momentum on ``jadam._engine``."""

from __future__ import annotations

from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import optax
from optax import contrib as optax_contrib

from jadam import _alias
from jadam import _engine
from jadam import _groups
from jadam import _rule
from jadam.sharding import _placement
from jadam import _transform
from jadam import _validation

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]


# The (count, nu) state of optax's schedule-free base step, so that its
# checkpoints restore into jadam. optax does not export it; eval_shape runs
# nothing at import (jadam.enable_cpu_fusion must come first).
ScaleBySecondMomentState = type(jax.eval_shape(
    optax.scale_by_rms(bias_correction=True).init, ()))


def _without_momentum_spec(b2: ArrayLike, eps: ArrayLike,
                           nu_dtype: Optional[Any]) -> _engine.Spec:
  """Adam with β1 = 0 storing only v, schedule-free AdamW's base step. The
  direction is g times 1/denominator, rounded as ``optax.scale_by_rms`` does,
  rather than one division."""
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

    return _rule.LeafRule(
        step, (True,), bounds, scalars=adam.scalars,
        second_moment=lambda new, s: _rule.second_moment((None,) + new, s))

  return _engine.Spec(
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
    groups: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Schedule-free AdamW (Defazio et al., 2024); keywords as optax's.

  Adam without momentum steps a sequence z; gradients are taken at
  ``y = (1 − β1)·z + β1·x``, x a running average of z, so no decaying
  schedule is needed. The optimizer updates y: **evaluate and save the model
  at x**, given by ``schedule_free_eval_params``.

  Args:
    learning_rate: peak step size, a float or a schedule (no decay needed).
    warmup_steps: if given, a linear warmup from 0 over this many steps.
    b1: interpolation weight β1 of x in y, in (0, 1) (it replaces momentum).
    b2, eps: as in ``jadam.scale_by_adam``.
    weight_decay: λ, >= 0, applied at y as ``−lr·λ·y`` (the authors' form).
    weight_lr_power: averaging weight of each step is ``max_lr`` to this power.
    state_dtype: storage dtype of z (None: the parameters').
    mask: where the decay applies, as in ``jadam.adamw``.
    nu_dtype: storage of v, as in ``jadam.scale_by_adam``.
    groups: parameter groups with their own ``eps``, ``b2``,
      ``weight_decay`` or ``frozen`` (as in ``jadam.adam``); the learning
      rate and β1 drive the averaging of every parameter, so they are not
      per group.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``ScheduleFreeState``.

  Example:
    >>> import jadam
    >>> opt = jadam.contrib.schedule_free_adamw(1e-2, warmup_steps=10)

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
  if groups is not None:
    base = _grouped_base(learning_rate, b2, eps, weight_decay, mask,
                         nu_dtype, groups)
  else:
    base = optax.chain(
        _engine.build(_without_momentum_spec(b2, eps, nu_dtype)),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate))
  # Its averaging weights and step count are made by optax's init.
  return _placement.placing_scalars(_dtypes_kept(optax_contrib.schedule_free(
      base, learning_rate=learning_rate, b1=b1,
      weight_lr_power=weight_lr_power, state_dtype=state_dtype)))


def _grouped_base(learning_rate, b2, eps, weight_decay, mask, nu_dtype,
                  groups) -> optax.GradientTransformation:
  """The base step with parameter groups: their own ε, β2, weight decay or
  frozen. Their learning rate and β1 are the averaging's, shared by all
  parameters (the weights of x's average are a function of the rate)."""
  layout = _groups.as_layout(groups)
  for group in layout.groups:
    shared = [name for name in ("learning_rate", "lr_scale", "b1")
              if getattr(group, name) is not None]
    if shared:
      raise ValueError(
          f"group {group.name!r} sets {', '.join(shared)}, but schedule-free "
          "AdamW averages every parameter with one schedule of the learning "
          "rate and one β1; give groups their own eps, b2, weight_decay or "
          "frozen, or run one schedule_free_adamw per group with "
          "optax.partition.")
  make = lambda b1=0.0, b2=b2, eps=eps: _without_momentum_spec(b2, eps,
                                                               nu_dtype)
  return _groups.grouped(make, dict(b1=0.0, b2=b2, eps=eps), learning_rate,
                         weight_decay, layout, mask)


def _dtypes_kept(tx: optax.GradientTransformation
                 ) -> optax.GradientTransformationExtraArgs:
  """``tx`` whose ``update`` keeps each state array in its ``init`` dtype:
  optax's schedule-free wrapper updates its averaging weights in the learning
  rate's dtype (a recompile and a checkpoint mismatch for bfloat16)."""
  tx = optax.with_extra_args_support(tx)

  def update_fn(updates, state, params=None, **extra_args):
    updates, new_state = tx.update(updates, state, params, **extra_args)
    return updates, jax.tree.map(
        lambda new, old: new.astype(old.dtype) if hasattr(old, "dtype")
        else new, new_state, state)
  return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def _with_linear_warmup(learning_rate: ScalarOrSchedule,
                        warmup_steps: int) -> optax.Schedule:
  """``learning_rate`` times a linear ramp from 0 over ``warmup_steps``; a
  constant as optax's schedule-free AdamW does it, bitwise."""
  if not callable(learning_rate):
    return optax.warmup_constant_schedule(
        init_value=0.0, peak_value=learning_rate, warmup_steps=warmup_steps)
  ramp = optax.linear_schedule(0.0, 1.0, warmup_steps)
  return lambda count: ramp(count) * learning_rate(count)


def schedule_free_eval_params(state: optax.OptState, params: Any) -> Any:
  """The parameters to evaluate (and save) a schedule-free model at: x.

  x is ``(y − (1 − β1)·z) / β1``, y the trained parameters.

  Args:
    state: an optimizer state holding exactly one schedule-free state (it
      may be inside ``optax.chain`` or ``optax.inject_hyperparams``).
    params: the current (training) parameters y.

  Returns:
    x, with the structure of ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, jadam
    >>> opt = optax.chain(optax.clip_by_global_norm(1.0),
    ...                   jadam.contrib.schedule_free_adamw(1e-2))
    >>> params = {"w": jnp.ones(2)}
    >>> x = jadam.contrib.schedule_free_eval_params(opt.init(params), params)

  References:
    Defazio et al., "The Road Less Scheduled", NeurIPS 2024 (arXiv:2405.15682).
  """
  is_sf = lambda node: isinstance(node, ScheduleFreeState)
  found = [node for node in jax.tree.leaves(state, is_leaf=is_sf)
           if is_sf(node)]
  if len(found) != 1:
    raise ValueError(
        f"schedule_free_eval_params needs an optimizer state holding exactly "
        f"one schedule-free state (from jadam.contrib.schedule_free_adamw); found "
        f"{len(found)}.")
  return optax_contrib.schedule_free_eval_params(found[0], params)

"""The skip decision: made by a wrapper, taken inside the moments' own pass.

``skip_nonfinite`` and ``skip_spikes`` pass it down as the extra ``update``
argument ``jadam_skip`` (optax's extra-args protocol). An engine update
selects each new moment against the old one where it is computed, since a
select over whole arrays afterwards makes XLA copy donated moments, and
records that it did, so the wrapper selects only the states no update took
care of (``apply``).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from jadam.sharding import _offload

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

SKIP = "jadam_skip"  # namespaced: no clash with others' extra arguments
# The spelling before 0.2, with the opposite polarity (True took the step).
_OLD = "jadam_step_if"


class Decision:
  """One ``update`` call's ``skip`` (a bool scalar), and which states took it.

  The record is not part of the pytree: across a ``jax.jit`` boundary only
  ``skip`` travels, and the wrapper selects every state, still correct.
  """

  __slots__ = ("skip", "_taken")

  def __init__(self, skip: ArrayLike):
    self.skip = skip
    # (given, returned) states of every update that took the decision.
    self._taken: list[tuple[Any, Any]] = []

  def record(self, given: Any, returned: Any) -> None:
    """Note that an update took the decision."""
    self._taken.append((given, returned))

  def returned(self, node: Any) -> bool:
    """Whether ``node`` is a state returned by an update that took it."""
    return any(node is r for _, r in self._taken)

  def taken(self, new: Any, old: Any) -> bool:
    """Whether an update given ``old`` returned ``new`` (no select needed)."""
    return any(new is r and old is g for g, r in self._taken)


jax.tree_util.register_pytree_node(
    Decision, lambda d: ((d.skip,), None), lambda _, c: Decision(*c))


def read(extra_args: dict[str, Any], count: Array
         ) -> tuple[Optional[Decision], Optional[Array], Array]:
  """``(decision, skip, t)`` from ``update``'s extra arguments: the
  ``Decision`` (or None), the bool ``skip`` (None if not passed) and the new
  count (unchanged where skipped). A TypeError unless a bool scalar."""
  value = extra_args.get(SKIP)
  invert = False
  if value is None and extra_args.get(_OLD) is not None:
    warnings.warn(f"jadam: the extra update argument {_OLD}=take is now "
                  f"{SKIP}=not take.", DeprecationWarning, stacklevel=3)
    value, invert = extra_args[_OLD], True
  t = optax.safe_increment(count)
  if value is None:
    return None, None, t
  decision = value if isinstance(value, Decision) else None
  skip = jnp.asarray(value.skip if decision is not None else value)
  if skip.dtype != jnp.bool_ or skip.shape != ():
    raise TypeError(f"{SKIP} must be a bool scalar (or a "
                    f"jadam._skip.Decision holding one), got "
                    f"{skip.dtype}{list(skip.shape)}.")
  if invert:
    skip = jnp.logical_not(skip)
  return decision, skip, jnp.where(skip, count, t)


def record(decision: Optional[Decision], given: Any, returned: Any) -> None:
  """``Decision.record`` when a decision was passed."""
  if decision is not None:
    decision.record(given, returned)


def zero_if(skip: Optional[Array], direction: Array) -> Array:
  """The direction of a skipped step: zero where ``skip``."""
  if skip is None:
    return direction
  return jnp.where(skip, jnp.zeros_like(direction), direction)


def apply(inner: optax.GradientTransformationExtraArgs, skip: Array,
          updates: Any, inner_state: Any, params: Optional[Any],
          extra_args: dict[str, Any]) -> tuple[Any, Any]:
  """``inner.update`` skipped where ``skip``: zero updates, the old state.

  The sequence every skipping wrapper runs: a fresh ``Decision`` goes down
  as ``jadam_skip``; a state whose update took it (given exactly this old
  state) comes back as it is, and every other array is selected against the
  old one where the old one lives (host memory under offload).

  Args:
    inner: the wrapped transformation, with extra-args support.
    skip: a bool scalar, True to skip this step.
    updates: the incoming gradients.
    inner_state: ``inner``'s state.
    params: the parameters, or None.
    extra_args: the wrapper's extra ``update`` arguments, passed on (with
      ``jadam_skip`` replaced).

  Returns:
    ``(updates, inner_state)`` after the step, or zeros and the old state.
  """
  # Fresh per call, so it cannot leak into another call, thread or trace.
  decision = Decision(skip)
  new_updates, new_state = inner.update(updates, inner_state, params,
                                        **{**extra_args, SKIP: decision})
  new_updates = jax.tree.map(
      lambda u: jnp.where(skip, jnp.zeros_like(u), u), new_updates)
  select = lambda new, old: _offload.in_memory_of(jnp.where(
      skip, _offload.on_device(old), _offload.on_device(new)), old)
  new_state = jax.tree.map(
      lambda new, old: new if decision.taken(new, old) else jax.tree.map(
          select, new, old),
      new_state, inner_state, is_leaf=decision.returned)
  return new_updates, new_state

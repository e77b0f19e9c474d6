"""The skip decision: made by a wrapper, taken inside the moments' own pass.

:func:`jadam.skip_nonfinite` decides per call whether to skip the step and
passes the decision down as the extra ``update`` argument ``jadam_skip``
(optax's extra-args protocol: ``optax.chain``, ``inject_hyperparams``,
``MultiSteps``, ``partition``, ``masked`` forward it). An engine update that
receives it selects every new moment against the old one where it is
computed (zero direction, count and moments bitwise unchanged), rather than
a select over whole arrays afterwards, which would make XLA copy donated
moments; and it records that it did, so that the wrapper selects only the
states no update took care of.

One word throughout: ``skip``, a bool scalar, True where the step is
skipped.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

# The extra ``update`` argument; namespaced so that it cannot collide with
# another transformation's extra argument.
SKIP = "jadam_skip"
# Its spelling before 0.2, with the opposite polarity (True took the step).
_OLD = "jadam_step_if"


class Decision:
  """One call's skip decision, passed to ``update`` as ``jadam_skip=``.

  :func:`jadam.skip_nonfinite` makes a fresh one in each ``update`` call.
  An update that takes the decision in its own pass records the state it
  was given and the state it returned; the wrapper then leaves those states
  alone. The record lives only as long as this object, one ``update`` call;
  it is not part of the pytree, so across a ``jax.jit`` boundary only
  ``skip`` travels and the wrapper selects every state, which is always
  correct.

  Attributes:
    skip: a bool scalar (traced or not): skip the step where True.
  """

  __slots__ = ("skip", "_taken")

  def __init__(self, skip: ArrayLike):
    self.skip = skip
    # (given state, returned state) of every update that took the decision.
    self._taken: list[tuple[Any, Any]] = []

  def record(self, given: Any, returned: Any) -> None:
    """Note that an update given ``given`` took the decision and returned
    ``returned``."""
    self._taken.append((given, returned))

  def returned(self, node: Any) -> bool:
    """Whether ``node`` is a state returned by an update that took it."""
    return any(node is r for _, r in self._taken)

  def taken(self, new: Any, old: Any) -> bool:
    """Whether an update given exactly ``old`` took the decision and
    returned exactly ``new``: then ``new`` is ``old`` bitwise where ``skip``
    is True, and needs no select."""
    return any(new is r and old is g for g, r in self._taken)


jax.tree_util.register_pytree_node(
    Decision, lambda d: ((d.skip,), None), lambda _, c: Decision(*c))


def read(extra_args: dict[str, Any], count: Array
         ) -> tuple[Optional[Decision], Optional[Array], Array]:
  """The skip decision among ``update``'s extra arguments, and the count.

  Returns:
    ``(decision, skip, t)``: the :class:`Decision` passed (None when a plain
    bool or nothing was passed), the bool scalar ``skip`` (None when nothing
    was passed), and the incremented ``count`` (``count`` itself where the
    step is skipped).

  Raises:
    TypeError: if the value is not a bool scalar.
  """
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
  """:meth:`Decision.record` when a decision was passed."""
  if decision is not None:
    decision.record(given, returned)


def zero_if(skip: Optional[Array], direction: Array) -> Array:
  """The direction of a skipped step: zero where ``skip``."""
  if skip is None:
    return direction
  return jnp.where(skip, jnp.zeros_like(direction), direction)

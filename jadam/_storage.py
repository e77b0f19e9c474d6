"""How a moment is kept between steps, separate from how it is computed.

The Adam rule (:mod:`jadam._rule`) always runs in float32 or wider. A moment's
*storage* format is chosen per moment (``mu_dtype``, ``nu_dtype``) and this
module converts between the two around each call of the rule, so that formats
never touch the arithmetic.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from jadam import _rule

Array = jax.Array


def compute_dtype(dtype: Any) -> jnp.dtype:
  """The dtype the rule runs in: the parameter's, but never below float32."""
  return jnp.promote_types(dtype, jnp.float32)


def real_dtype(dtype: Any) -> jnp.dtype:
  """float32 for complex64 etc.: |g|² moments of complex parameters are real."""
  return jnp.finfo(dtype).dtype


def zeros(like: Array, shape: tuple[int, ...], dtype: Any) -> Array:
  """Zeros of ``shape`` and ``dtype`` for optimizer state derived from ``like``.

  Every zero-initialised piece of state is made here, so that where state is
  placed (for example on the parameter's sharding) is decided in one place.
  """
  # Placement on a device mesh is the sharding module's concern; imported
  # here because this function's body is the only hook it owns in this file.
  from jadam import _sharding  # pylint: disable=g-import-not-at-top
  return _sharding.zeros_placed_like(like, shape, dtype)


def init_moment(param: Array, storage: Optional[str], *, real: bool) -> Array:
  """Zeros for one moment of one parameter in its storage format.

  Args:
    param: the parameter (or a ``jax.ShapeDtypeStruct``).
    storage: canonical storage dtype name, or None to follow the parameter.
    real: the moment is of |g|² and so real even for complex parameters.
  """
  dtype = param.dtype if storage is None else jnp.dtype(storage)
  if real:
    dtype = real_dtype(dtype)
  return zeros(param, param.shape, dtype)


def load(stored: Array, dtype: Any) -> Array:
  """A stored moment in the compute dtype."""
  return stored.astype(dtype)


def store(value: Array, like: Array) -> Array:
  """A moment computed in the compute dtype, put back in its storage format."""
  return value.astype(like.dtype)


def step_leaf(g: Array, stored: _rule.Moments, t: Array,
              rule: _rule.AdamRule) -> tuple[Array, _rule.Moments]:
  """Load one leaf's moments, take one Adam step, store them again.

  Returns:
    ``(direction, stored_moments)``: the direction in the gradient's dtype.
  """
  dtype = compute_dtype(g.dtype)
  real = real_dtype(dtype)
  moments = _rule.Moments(
      mu=load(stored.mu, dtype),
      nu=load(stored.nu, real),
      nu_max=None if stored.nu_max is None else load(stored.nu_max, real))
  direction, new = _rule.adam_step(g.astype(dtype), moments, t, rule)
  return direction.astype(g.dtype), _rule.Moments(
      mu=store(new.mu, stored.mu),
      nu=store(new.nu, stored.nu),
      nu_max=None if new.nu_max is None else store(new.nu_max, stored.nu_max))

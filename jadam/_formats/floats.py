"""Float storage of a moment: float32/float64 as is, bfloat16 and float16
rounded stochastically, float16 second moments as √v.

The rule (:mod:`jadam._rule`) runs in float32 or wider; a narrow format only
changes how a moment is kept between steps. Rounding it to nearest would stall
it: a second moment multiplied by β2 = 0.999 rounds back to its old bfloat16
value every step and never decays, and gradients below the spacing of the
stored first moment never enter it. Stochastic rounding (unbiased, seeded by
the step and the element, :mod:`jadam._rounding`) keeps both in expectation.
float16 cannot hold v = g² (it underflows below |g| ≈ 2.4e-4 and overflows
above |g| = 256), so a float16 second moment keeps √v, which has the range of
g itself. bfloat16, float16 and int8 have no complex numbers: a complex first
moment stored in them stays in the compute dtype (complex64 or wider).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from jadam import _boxes
from jadam import _rounding
from jadam.sharding import _placement
from jadam import _validation

Array = jax.Array

def compute_dtype(dtype: Any) -> jnp.dtype:
  """The dtype the rule runs in: the parameter's, but never below float32."""
  return jnp.promote_types(dtype, jnp.float32)


def real_dtype(dtype: Any) -> jnp.dtype:
  """float32 for complex64 etc.: |g|² moments of complex parameters are real."""
  return jnp.finfo(dtype).dtype


def inexact(dtype: Any) -> bool:
  return jnp.issubdtype(dtype, jnp.inexact)


@dataclasses.dataclass(frozen=True)
class FloatLeaf:
  """One moment of one parameter kept as a float array of its shape.

  Attributes:
    dtype: the stored dtype's name.
    root: the array holds √v (a float16 second moment).
  """

  dtype: str
  root: bool = False

  @property
  def rounds(self) -> bool:
    """Whether storing needs random bits (a narrow float format)."""
    return jnp.dtype(self.dtype).itemsize < 4

  def zeros(self, param: Any) -> Array:
    return _placement.zeros_placed_like(param, param.shape, self.dtype)

  def boxed(self, box: Any, stored: Array) -> Any:
    """``stored`` in the parameter's Flax box, if it has one."""
    return _boxes.close_like(box, stored)

  def matches(self, stored: Any) -> bool:
    return hasattr(stored, "dtype") and jnp.dtype(stored.dtype) == self.dtype

  def nbytes(self, shape: tuple[int, ...]) -> int:
    return int(jnp.dtype(self.dtype).itemsize) * _size(shape)

  def __str__(self) -> str:
    return f"{self.dtype} √v" if self.root else self.dtype

  def load(self, stored: Array, dtype: Any) -> Array:
    """The stored moment in the compute ``dtype``."""
    value = stored.astype(dtype)
    return value * value if self.root else value

  def store(self, value: Array, bits: Optional[Array]) -> Array:
    """``value`` (compute dtype) in this format, rounded stochastically with
    the top 16 of the uint32 ``bits`` where the format is narrow."""
    if self.root:
      value = jnp.sqrt(value)
    if self.rounds:
      return _rounding.round_stochastic(value, jnp.dtype(self.dtype), bits)
    return value.astype(self.dtype)


def _size(shape: tuple[int, ...]) -> int:
  n = 1
  for d in shape:
    n *= int(d)
  return n


@dataclasses.dataclass(frozen=True)
class Float:
  """A float storage format: ``jadam.Float(jnp.bfloat16)`` is what
  ``mu_dtype=jnp.bfloat16`` means; ``Float()`` (``None``) keeps the
  parameter's dtype, as optax does.

  Attributes:
    dtype: a float or complex dtype name, or None for the parameter's.
  """

  dtype: Optional[str] = None

  def __post_init__(self):
    if self.dtype is not None:
      object.__setattr__(self, "dtype", canonical("dtype", self.dtype))

  def for_leaf(self, shape: tuple[int, ...], dtype: Any, *,
               second: bool) -> FloatLeaf:
    """What this format stores for a parameter of ``shape`` and ``dtype``
    (``second``: the moment is of |g|², real for complex parameters)."""
    del shape
    dtype = jnp.dtype(dtype)
    if not inexact(dtype):
      # Integer and boolean leaves (step counters, frozen buffers) get zeros
      # of their own dtype, as optax gives them; a gradient for them is an
      # error at update, naming the key path.
      return FloatLeaf(dtype.name)
    if self.dtype is None:
      stored = real_dtype(dtype) if second else dtype
    else:
      compute = compute_dtype(dtype)
      if second:
        compute = real_dtype(compute)
      stored = jnp.dtype(self.dtype)
      if (jnp.issubdtype(stored, jnp.complexfloating)
          and not jnp.issubdtype(compute, jnp.complexfloating)):
        stored = real_dtype(stored)  # complex storage of a real moment
      if jnp.issubdtype(compute, jnp.complexfloating):
        stored = (jnp.result_type(stored, jnp.complex64)
                  if stored.itemsize >= 4 else compute)
    stored = jnp.dtype(stored)
    return FloatLeaf(stored.name, root=second and stored == jnp.float16)

  def __str__(self) -> str:
    return self.dtype or "the parameter's dtype"


def canonical(name: str, dtype: Any) -> str:
  """The canonical name of a float storage dtype (ValueError naming the
  argument for anything else)."""
  return _validation.canonical_storage(name, dtype, extra=("int8",))

"""Float storage of a moment; the rule itself runs in float32 or wider.

bfloat16 and float16 round stochastically (to nearest, v·β2 rounds back to
v); float16 keeps √v, as g² under- or overflows for |g| < 2.4e-4 or > 256.
A complex first moment keeps the compute dtype (no narrow complex formats).
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
  """float32 for complex64 etc.: |g|² moments are real."""
  return jnp.finfo(dtype).dtype


def inexact(dtype: Any) -> bool:
  return jnp.issubdtype(dtype, jnp.inexact)


@dataclasses.dataclass(frozen=True)
class FloatLeaf:
  """A moment as a float array of ``dtype`` (a name), √v if ``root``."""

  dtype: str
  root: bool = False

  @property
  def rounds(self) -> bool:
    return jnp.dtype(self.dtype).itemsize < 4

  def zeros(self, param: Any) -> Array:
    return _placement.zeros_placed_like(param, param.shape, self.dtype)

  def boxed(self, box: Any, stored: Array) -> Any:
    return _boxes.close_like(box, stored)

  def matches(self, stored: Any) -> bool:
    return hasattr(stored, "dtype") and jnp.dtype(stored.dtype) == self.dtype

  def nbytes(self, shape: tuple[int, ...]) -> int:
    return int(jnp.dtype(self.dtype).itemsize) * _size(shape)

  def __str__(self) -> str:
    return f"{self.dtype} √v" if self.root else self.dtype

  def load(self, stored: Array, dtype: Any) -> Array:
    value = stored.astype(dtype)
    return value * value if self.root else value

  def round_trip(self, value: Array) -> Array:
    """``value`` stored with nearest rounding and loaded back: the error
    this format adds, for the numerics doctor."""
    return self.load(self.store(value, None) if not self.rounds else (
        (jnp.sqrt(value) if self.root else value).astype(self.dtype)),
        value.dtype)

  def store(self, value: Array, bits: Optional[Array]) -> Array:
    """``value`` in this format, rounded with the top 16 of ``bits``."""
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
  """A float storage format for one moment.

  ``jadam.Float(jnp.bfloat16)`` is what ``mu_dtype=jnp.bfloat16`` means;
  ``Float()`` keeps the parameter's dtype, as optax does. bfloat16 and
  float16 are rounded stochastically; a float16 second moment keeps √v.

  Attributes:
    dtype: a float or complex dtype name, or None for the parameter's.
  """

  dtype: Optional[str] = None

  def __post_init__(self):
    if self.dtype is not None:
      object.__setattr__(self, "dtype", canonical("dtype", self.dtype))

  def for_leaf(self, shape: tuple[int, ...], dtype: Any, *,
               second: bool) -> FloatLeaf:
    del shape
    dtype = jnp.dtype(dtype)
    if not inexact(dtype):
      # Integer leaves get zeros of their own dtype, as in optax; a gradient
      # for them is an error at update.
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
  """The canonical name of a storage dtype (ValueError naming ``name``)."""
  return _validation.canonical_storage(name, dtype, extra=("int8",))

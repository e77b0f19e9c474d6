"""How a moment is kept between steps: storage formats as objects.

A format (``mu_dtype=``) resolves per parameter (``for_leaf``) to a leaf
format that makes, loads and stores the moment: the engine never reads a
dtype to decide. A new format adds both classes and a branch of the step.
"""

from __future__ import annotations

from typing import Any, Protocol, Union

import jax

from jadam._formats import floats
from jadam._formats import int8
from jadam._formats.floats import Float
from jadam._formats.int8 import BlockwiseInt8
from jadam._formats.int8 import Int8Moment

LeafFormat = Union[floats.FloatLeaf, int8.Int8Leaf]


class Format(Protocol):
  """A storage format of one moment (``Float``, ``BlockwiseInt8``)."""

  def for_leaf(self, shape: tuple[int, ...], dtype: Any, *,
               second: bool) -> LeafFormat:
    """The leaf format for a parameter (``second``: a moment of |g|²)."""


def as_format(name: str, value: Any) -> Format:
  """The format named by ``mu_dtype=``/``nu_dtype=`` (ValueError if none)."""
  if isinstance(value, (Float, BlockwiseInt8)):
    return value
  if value is None:
    return Float()
  canonical = floats.canonical(name, value)
  return BlockwiseInt8() if canonical == "int8" else Float(canonical)


def is_moment_leaf(x: Any) -> bool:
  """``is_leaf`` for trees of stored moments: an Int8Moment is one leaf."""
  return isinstance(x, Int8Moment)


def found(stored: Any, shape: tuple[int, ...], *, second: bool) -> LeafFormat:
  """The leaf format a stored moment was kept in, read from the leaf."""
  if isinstance(stored, Int8Moment):
    return int8.found(stored, shape)
  dtype = jax.numpy.dtype(stored.dtype)
  return floats.FloatLeaf(dtype.name, root=second and dtype == "float16")


def load(stored: Any, dtype: Any, *, second: bool) -> jax.Array:
  """A stored moment decoded to ``dtype`` (complex moments stay complex)."""
  leaf = stored.codes if isinstance(stored, Int8Moment) else stored
  if jax.numpy.iscomplexobj(leaf):
    dtype = jax.numpy.result_type(dtype, jax.numpy.complex64)
  return found(stored, tuple(leaf.shape), second=second).load(stored, dtype)

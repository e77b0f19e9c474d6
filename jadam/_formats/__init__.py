"""How a moment is kept between steps: storage formats as objects.

A format is chosen once, when an optimizer is built (``mu_dtype=``,
``nu_dtype=``: None, a float dtype, ``"int8"`` or a format object), and kept
in the transformation's closure. For each parameter it resolves to what one
moment of that parameter stores (``for_leaf``): a :class:`floats.FloatLeaf`
(an array of the parameter's shape) or an :class:`int8.Int8Leaf` (an
:class:`int8.Int8Moment` leaf of codes and block scales). The engine asks
the resolved leaf format to make, load and store the moment; it never looks
at a dtype or a shape to decide what a moment is.

A new format is one class with ``for_leaf`` returning a leaf format with
``zeros``, ``boxed``, ``matches``, ``nbytes`` and ``load``, and a branch
of the engine's step for its arithmetic (see :mod:`jadam._formats.int8`).
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
  """A storage format of one moment (:class:`Float`, :class:`BlockwiseInt8`)."""

  def for_leaf(self, shape: tuple[int, ...], dtype: Any, *,
               second: bool) -> LeafFormat:
    """What the format stores for a parameter of ``shape`` and ``dtype``
    (``second``: a moment of |g|²)."""


def as_format(name: str, value: Any) -> Format:
  """The format asked for by ``mu_dtype=`` / ``nu_dtype=``.

  Raises:
    ValueError: naming the argument, for anything that is not None, a float
      dtype, ``"int8"`` or a format object.
  """
  if isinstance(value, (Float, BlockwiseInt8)):
    return value
  if value is None:
    return Float()
  canonical = floats.canonical(name, value)
  return BlockwiseInt8() if canonical == "int8" else Float(canonical)


def is_moment_leaf(x: Any) -> bool:
  """``is_leaf`` for trees of stored moments: an :class:`Int8Moment` is one
  leaf."""
  return isinstance(x, Int8Moment)


def found(stored: Any, shape: tuple[int, ...], *, second: bool) -> LeafFormat:
  """The leaf format a stored moment was kept in, read from the stored
  leaf itself (for describing and decoding states, and for error messages)."""
  if isinstance(stored, Int8Moment):
    return int8.found(stored, shape)
  dtype = jax.numpy.dtype(stored.dtype)
  return floats.FloatLeaf(dtype.name, root=second and dtype == "float16")


def load(stored: Any, dtype: Any, *, second: bool) -> jax.Array:
  """A stored moment (an array or an :class:`Int8Moment`) decoded to
  ``dtype`` (complex moments stay complex)."""
  leaf = stored.codes if isinstance(stored, Int8Moment) else stored
  if jax.numpy.iscomplexobj(leaf):
    dtype = jax.numpy.result_type(dtype, jax.numpy.complex64)
  return found(stored, tuple(leaf.shape), second=second).load(stored, dtype)

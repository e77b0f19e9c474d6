"""How a moment is kept between steps, separate from how it is computed.

The Adam rule (:mod:`jadam._rule`) always runs in float32 or wider. A moment's
*storage* format is chosen per moment (``mu_dtype``, ``nu_dtype``) and this
module converts between the two around each call of the rule, so that formats
never touch the arithmetic.

Formats:

* float32 / float64: the moment as is.
* bfloat16 / float16: rounded *stochastically* when stored (unbiased, see
  :mod:`jadam._rounding`), seeded by the step count and the leaf's position,
  so a v multiplied by β2 = 0.999 decays in expectation although 0.999 is not
  a bfloat16 decay factor. float16 keeps √v (:class:`SquareRootMoment`)
  because v itself under- and overflows float16.
* ``"int8"`` / :class:`jadam.BlockwiseInt8`: block-wise 8-bit codes with a
  float32 scale per block (:mod:`jadam._quant`), leaves below ``min_size``
  elements in float32.
* A complex first moment in a format without complex numbers is kept as its
  real and imaginary parts (:class:`SplitComplex`).

Compressed formats are small pytree nodes (:data:`STORED_NODES`) standing for
one parameter leaf; :func:`decode` reads any of them back as an array.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp

from jadam import _quant
from jadam import _rounding
from jadam import _rule
from jadam import _validation

Array = jax.Array
# A canonical float dtype name, the int8 block format, or None (the param's).
Storage = Optional[Union[str, _quant.BlockwiseInt8]]


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SquareRootMoment:
  """A second moment kept as √v in float16.

  float16 cannot hold v = g² for most gradients: its smallest normal number
  is 6.1e-5, so |g| < 8e-3 gives a v that loses precision and |g| < 2.4e-4
  one that underflows to zero, while |g| > 256 overflows. √v has the range of
  g itself, which float16 covers from 6e-8 to 65504.

  Attributes:
    root: float16 array of the parameter's shape, √v.
  """

  root: Array

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.root.shape)

  @property
  def dtype(self):
    return self.root.dtype


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SplitComplex:
  """A complex first moment stored as two real moments (bfloat16, float16
  and int8 have no complex counterpart).

  Attributes:
    real: the real part, in the storage format.
    imag: the imaginary part, in the storage format.
  """

  real: Any
  imag: Any

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.real.shape)


STORED_NODES = (_quant.QuantizedMoment, SquareRootMoment, SplitComplex)


def is_stored_node(x: Any) -> bool:
  """True for a compressed moment that stands for one parameter leaf.

  Use as ``is_leaf`` when walking a moment tree next to the parameters.
  """
  return isinstance(x, STORED_NODES)


def canonical_storage(name: str, dtype: Any) -> Storage:
  """The storage format asked for by ``mu_dtype=`` / ``nu_dtype=``.

  Returns:
    None (follow the parameter), a canonical float dtype name, or a
    :class:`~jadam.BlockwiseInt8` (``"int8"`` means its defaults).

  Raises:
    ValueError: naming the argument, for anything else.
  """
  if isinstance(dtype, _quant.BlockwiseInt8):
    return dtype
  canonical = _validation.canonical_storage(name, dtype, extra=("int8",))
  return _quant.BlockwiseInt8() if canonical == "int8" else canonical


def init_moment(param: Array, storage: Storage, *, real: bool,
                squared: bool = False) -> Any:
  """Zeros for one moment of one parameter in its storage format.

  Args:
    param: the parameter (or a ``jax.ShapeDtypeStruct``).
    storage: canonical storage dtype name, a :class:`~jadam.BlockwiseInt8`,
      or None to follow the parameter.
    real: the moment is of |g|² and so real even for complex parameters.
    squared: the moment has the units of g² (Adam's v, AMSGrad's max v̂,
      but not AdaMax's u); float16 then keeps √v.

  Returns:
    An array, or a node of :data:`STORED_NODES` for compressed formats.
  """
  if storage is None:
    dtype = real_dtype(param.dtype) if real else param.dtype
    return zeros(param, param.shape, dtype)
  complex_value = (not real
                   and jnp.issubdtype(param.dtype, jnp.complexfloating))
  if isinstance(storage, _quant.BlockwiseInt8):
    if not storage.applies_to(math.prod(param.shape)):
      # Small leaves stay in the compute dtype, as in Dettmers et al.
      dtype = compute_dtype(param.dtype)
      return zeros(param, param.shape, real_dtype(dtype) if real else dtype)
    if complex_value:
      return SplitComplex(_init_real(param, storage, signed=True),
                          _init_real(param, storage, signed=True))
    return _init_real(param, storage, signed=not real)
  dtype = jnp.dtype(storage)
  if complex_value:
    if dtype.itemsize >= 4:
      # float32 storage of a complex64 moment means complex64, and so on.
      return zeros(param, param.shape, jnp.result_type(dtype, jnp.complex64))
    return SplitComplex(zeros(param, param.shape, dtype),
                        zeros(param, param.shape, dtype))
  if squared and dtype == jnp.float16:
    return SquareRootMoment(zeros(param, param.shape, dtype))
  return zeros(param, param.shape, dtype)


def _init_real(param: Array, storage: _quant.BlockwiseInt8, *,
               signed: bool) -> _quant.QuantizedMoment:
  """Zero codes and scales for a real moment of ``param``'s shape."""
  n_blocks = storage.n_blocks(math.prod(param.shape))
  return _quant.QuantizedMoment(
      codes=zeros(param, (n_blocks, storage.block_size), jnp.uint8),
      scales=zeros(param, (n_blocks,), jnp.float32),
      shape=tuple(param.shape), signed=signed,
      stochastic=storage.stochastic)


def load(stored: Any, dtype: Any) -> Array:
  """A stored moment as one array in the compute ``dtype``."""
  if isinstance(stored, _quant.QuantizedMoment):
    return _quant.dequantize(stored).astype(dtype)
  if isinstance(stored, SquareRootMoment):
    root = stored.root.astype(dtype)
    return root * root
  if isinstance(stored, SplitComplex):
    real = real_dtype(dtype)
    return jax.lax.complex(load(stored.real, real), load(stored.imag, real))
  return stored.astype(dtype)


def store(value: Array, like: Any, bits: Optional[Array]) -> Any:
  """A moment computed in the compute dtype, put back in ``like``'s format.

  Narrow formats round stochastically (unbiased), using the top 16 of the
  uint32 random ``bits`` (of ``value.shape``; None if ``like`` needs none):
  otherwise a second moment multiplied by β2 = 0.999 rounds back to its old
  bfloat16 value every step and never decays, and gradients smaller than the
  spacing of the stored first moment never enter it.
  """
  if isinstance(like, _quant.QuantizedMoment):
    tiles = _quant.to_blocks(value.astype(jnp.float32), like.block_size)
    if like.stochastic:
      bits = _quant.to_blocks(bits, like.block_size)
    codes, scales = _quant.quantize_blocks(
        tiles, like.signed, bits if like.stochastic else None)
    return dataclasses.replace(like, codes=codes, scales=scales)
  if isinstance(like, SquareRootMoment):
    return SquareRootMoment(store(jnp.sqrt(value), like.root, bits))
  if isinstance(like, SplitComplex):
    return SplitComplex(
        store(jnp.real(value), like.real, bits),
        store(jnp.imag(value), like.imag,
              None if bits is None else _rounding.remix(bits)))
  if jnp.dtype(like.dtype).itemsize < 4:
    return _rounding.round_stochastic(value, like.dtype, bits)
  return value.astype(like.dtype)


def _needs_bits(stored: Any) -> bool:
  """Whether storing into ``stored`` rounds stochastically."""
  for leaf in jax.tree.leaves(stored, is_leaf=is_stored_node):
    if isinstance(leaf, _quant.QuantizedMoment):
      if leaf.stochastic:
        return True
    elif isinstance(leaf, (SquareRootMoment, SplitComplex)):
      if _needs_bits(dataclasses.astuple(leaf)):
        return True
    elif jnp.dtype(leaf.dtype).itemsize < 4:
      return True
  return False


def decode(stored: Any, dtype: Any = jnp.float32) -> Array:
  """The values of one stored moment leaf, in ``dtype`` (complex kept).

  Works for every storage format, compressed or not; apply it with
  ``jax.tree.map(decode, state.nu, is_leaf=is_stored_node)`` to read a whole
  moment tree (for example to log statistics of v).
  """
  if isinstance(stored, SplitComplex):
    return load(stored, jnp.result_type(dtype, jnp.complex64))
  return load(stored, dtype)


def decode_moments(tree: Any, dtype: Any = jnp.float32) -> Any:
  """A moment tree from an optimizer state, with every leaf as an array.

  Compressed moments (int8 blocks, float16 √v, split complex) are decoded;
  plain arrays are cast to ``dtype``. Use it to log or inspect moments
  whatever their storage format.

  Args:
    tree: for example ``state.mu`` or ``state.nu`` of a jadam state.
    dtype: float dtype of the result (complex moments stay complex).

  Returns:
    A tree with the parameters' structure.

  Example:
    >>> import jax.numpy as jnp, jadam
    >>> state = jadam.scale_by_adam(nu_dtype="int8").init({"w": jnp.ones(8192)})
    >>> jadam.decode_moments(state.nu)["w"].shape
    (8192,)
  """
  return jax.tree.map(lambda leaf: decode(leaf, dtype), tree,
                      is_leaf=is_stored_node)


def step_leaf(g: Array, stored: _rule.Moments, t: Array,
              rule: _rule.AdamRule, index: int = 0
              ) -> tuple[Array, _rule.Moments]:
  """Load one leaf's moments, take one Adam step, store them again.

  Args:
    g: the gradient of this leaf.
    stored: its moments in their storage formats.
    t: the step number (int32, from 1).
    rule: the Adam variant.
    index: the leaf's position in the tree; with ``t`` it seeds stochastic
      rounding, so that every leaf and step draws different bits and a run
      is reproducible without keeping a key in the state.

  Returns:
    ``(direction, stored_moments)``: the direction in the gradient's dtype.
  """
  seed = _rounding.salt(t, index)
  block_sizes = [leaf.block_size for leaf in jax.tree.leaves(
      stored, is_leaf=lambda x: isinstance(x, _quant.QuantizedMoment))
                 if isinstance(leaf, _quant.QuantizedMoment)]
  if block_sizes and g.size:
    return _step_tiled(g, stored, t, rule, seed, math.lcm(*block_sizes))
  dtype = compute_dtype(g.dtype)
  real = real_dtype(dtype)
  moments = _rule.Moments(
      mu=load(stored.mu, dtype),
      nu=load(stored.nu, real),
      nu_max=None if stored.nu_max is None else load(stored.nu_max, real))
  direction, new = _rule.adam_step(g.astype(dtype), moments, t, rule)
  bits = (_rounding.random_bits(g.shape, seed) if _needs_bits(stored)
          else None)
  mu_bits, nu_bits, max_bits = _streams(bits)
  return direction.astype(g.dtype), _rule.Moments(
      mu=store(new.mu, stored.mu, mu_bits),
      nu=store(new.nu, stored.nu, nu_bits),
      nu_max=None if new.nu_max is None else store(
          new.nu_max, stored.nu_max, max_bits))


def _streams(bits: Optional[Array]):
  """Random bits for m, v and max v̂ from one hash per element: m uses the
  top 16 bits, v the bottom 16, and only AMSGrad pays for a second hash."""
  if bits is None:
    return None, None, None
  return bits, bits << 16, _rounding.remix(bits)


# Elements per tile of the quantized path: small enough that a tile's float32
# intermediates stay in cache, large enough that the loop costs nothing.
TILE_ELEMENTS = 1 << 18


def _step_tiled(g: Array, stored: _rule.Moments, t: Array,
                rule: _rule.AdamRule, seed: Array, unit: int
                ) -> tuple[Array, _rule.Moments]:
  """:func:`step_leaf` for leaves with block-quantized moments.

  A loop over tiles of whole blocks decodes one tile of each moment, applies
  the rule to it, and re-encodes it into the codes in place, so a moment is
  never held in float32 beyond one tile (``TILE_ELEMENTS``). The tail that
  does not fill a tile is one more, smaller, tile.

  Cautious masking normalises over the whole array, so it is applied to the
  finished direction after the loop (it reads no moment).
  """
  dtype = compute_dtype(g.dtype)
  real = real_dtype(dtype)
  n = g.size
  tile = unit * max(1, TILE_ELEMENTS // unit)
  n_loop, rest = divmod(n, tile)
  flat_g = g.reshape(-1)
  cautious = bool(getattr(rule, "cautious", False))
  tile_rule = rule._replace(cautious=False) if cautious else rule
  out_dtype = dtype if cautious else g.dtype

  def tile_step(start, length, carry):
    moments, direction = carry
    padded = -(-length // unit) * unit
    g_tile = jax.lax.dynamic_slice(flat_g, (start,), (length,)).astype(dtype)
    loaded = _rule.Moments(
        mu=_read(moments.mu, start, length, dtype),
        nu=_read(moments.nu, start, length, real),
        nu_max=None if moments.nu_max is None else _read(
            moments.nu_max, start, length, real))
    d_tile, new = _rule.adam_step(g_tile, loaded, t, tile_rule)
    bits = (_rounding.random_bits((padded,), seed, offset=start)
            if _needs_bits(moments) else None)
    mu_bits, nu_bits, max_bits = _streams(bits)
    moments = _rule.Moments(
        mu=_write(moments.mu, new.mu, start, mu_bits),
        nu=_write(moments.nu, new.nu, start, nu_bits),
        nu_max=None if new.nu_max is None else _write(
            moments.nu_max, new.nu_max, start, max_bits))
    direction = jax.lax.dynamic_update_slice(
        direction, d_tile.astype(out_dtype), (start,))
    return moments, direction

  carry = (stored, jnp.zeros((n,), out_dtype))
  if n_loop:
    carry = jax.lax.fori_loop(
        0, n_loop, lambda i, c: tile_step(i * tile, tile, c), carry)
  if rest:
    carry = tile_step(n_loop * tile, rest, carry)
  moments, direction = carry
  direction = direction.reshape(g.shape)
  if cautious:
    direction = _rule.caution(direction, g.astype(dtype))
  return direction.astype(g.dtype), moments


def _read(stored: Any, start: Any, length: int, dtype: Any) -> Array:
  """Elements ``[start, start + length)`` of a stored moment, flat."""
  if isinstance(stored, _quant.QuantizedMoment):
    block = stored.block_size
    n_blocks = -(-length // block)
    first = start // block
    codes = jax.lax.dynamic_slice(stored.codes, (first, 0), (n_blocks, block))
    scales = jax.lax.dynamic_slice(stored.scales, (first,), (n_blocks,))
    values = _quant.dequantize_blocks(codes, scales, stored.signed)
    return values.reshape(-1)[:length].astype(dtype)
  if isinstance(stored, SquareRootMoment):
    root = _read(stored.root, start, length, dtype)
    return root * root
  if isinstance(stored, SplitComplex):
    real = real_dtype(dtype)
    return jax.lax.complex(_read(stored.real, start, length, real),
                           _read(stored.imag, start, length, real))
  flat = stored.reshape(-1)
  return jax.lax.dynamic_slice(flat, (start,), (length,)).astype(dtype)


def _write(stored: Any, value: Array, start: Any,
           bits: Optional[Array]) -> Any:
  """``stored`` with elements ``[start, start + len(value))`` set to
  ``value`` (flat, compute dtype), rounded into its format."""
  length = value.shape[0]
  if isinstance(stored, _quant.QuantizedMoment):
    block = stored.block_size
    n_blocks = -(-length // block)
    padded = n_blocks * block
    value = value.astype(jnp.float32)
    if padded > length:
      value = jnp.pad(value, (0, padded - length))
    tile_bits = (bits[:padded].reshape(n_blocks, block) if stored.stochastic
                 else None)
    codes, scales = _quant.quantize_blocks(
        value.reshape(n_blocks, block), stored.signed, tile_bits)
    first = start // block
    return dataclasses.replace(
        stored,
        codes=jax.lax.dynamic_update_slice(stored.codes, codes, (first, 0)),
        scales=jax.lax.dynamic_update_slice(stored.scales, scales, (first,)))
  if isinstance(stored, SquareRootMoment):
    return SquareRootMoment(_write(stored.root, jnp.sqrt(value), start, bits))
  if isinstance(stored, SplitComplex):
    return SplitComplex(
        _write(stored.real, jnp.real(value), start, bits),
        _write(stored.imag, jnp.imag(value), start,
               None if bits is None else _rounding.remix(bits)))
  value = store(value, stored, None if bits is None else bits[:length])
  flat = jax.lax.dynamic_update_slice(stored.reshape(-1), value, (start,))
  return flat.reshape(stored.shape)

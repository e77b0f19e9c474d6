"""Block-wise 8-bit storage of optimizer moments with dynamic code maps.

After Dettmers, Lewis, Shleifer & Zettlemoyer, "8-bit Optimizers via
Block-wise Quantization", ICLR 2022:

* A moment leaf is cut into blocks of ``block_size`` elements (256 by
  default); each block keeps one float32 scale, its largest finite |value|.
  An outlier then only costs precision inside its own block.
* Each element is stored as one byte: an index into a *dynamic* code map, a
  fixed table of 255 values in [-1, 1] (first moment) or [0, 1] (second
  moment) that is dense near the block's maximum and spread over many binary
  orders of magnitude below it, so that small values are kept relative to
  their own size rather than rounded to zero. The 256th code marks a
  non-finite value (NaN, ±inf), which decodes to NaN so that a poisoned
  moment stays visible instead of turning into a number.

The code map is ours, not the paper's base-10 "dynamic tree": it is laid out
in binary octaves ``[2^-(k+1), 2^-k)``, each holding a power-of-two number of
evenly spaced points, more near 1 and fewer further down (see
``_SIGNED_OCTAVES`` and ``_UNSIGNED_OCTAVES``). Because the points are in
increasing order and the octaves abut, encoding is integer arithmetic on the
float32 bit pattern (exponent selects the octave, the top mantissa bits the
point), with no search. Rounding is stochastic by default: the code above is
chosen with probability equal to the covered fraction of the gap, so stored
moments are unbiased, and a second moment multiplied by β2 = 0.999 decays in
expectation instead of rounding back to the same code forever.

Leaves with fewer than ``min_size`` elements (4096 by default) stay float32,
as in the paper: their bytes do not matter and they are often biases and norm
scales, where precision does.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Points per octave, from [1/2, 1) downwards. A signed code has 127 magnitudes
# besides zero (126 octave points and 1.0), an unsigned one 254. The second
# moment gets more octaves because v spans twice the orders of magnitude of m.
_SIGNED_OCTAVES = (16, 16, 16, 8, 8, 8, 8) + (4,) * 10 + (2,) * 3
_UNSIGNED_OCTAVES = (32, 32, 32, 16, 16, 16, 16) + (8,) * 8 + (4,) * 7 + (1,)
NAN_CODE = 255


def _octave_tables(octaves: tuple[int, ...]):
  """Per-octave (first magnitude index, log2 of points), top octave first."""
  log2_points = [int(np.log2(n)) for n in octaves]
  assert all(2**b == n for b, n in zip(log2_points, octaves))
  # Magnitude index 0 is zero; index 1 is 2^-K, the bottom of the lowest
  # octave; the octaves follow in increasing order up to 1.0.
  first = np.cumsum([1] + list(octaves[::-1]))[:-1][::-1]
  return [int(f) for f in first], log2_points


def _segments(signed: bool):
  """Runs of octaves with equal point counts, as (top octave k0, number of
  octaves, log2 points, magnitude index of k0's first point), top first.

  Encoding and decoding select among these few runs with ``where`` rather
  than indexing a table: gathers are slow in XLA's CPU loops.
  """
  octaves = _SIGNED_OCTAVES if signed else _UNSIGNED_OCTAVES
  first, log2_points = _octave_tables(octaves)
  runs = []
  for k, b in enumerate(log2_points):
    if runs and runs[-1][2] == b:
      runs[-1][1] += 1
    else:
      runs.append([k, 1, b, first[k]])
  return [tuple(r) for r in runs]


def magnitudes(signed: bool) -> np.ndarray:
  """The non-negative values of a code map, index 0 (zero) to 1.0, float32."""
  octaves = _SIGNED_OCTAVES if signed else _UNSIGNED_OCTAVES
  values = [0.0]
  for k in reversed(range(len(octaves))):
    n = octaves[k]
    values += [2.0**-(k + 1) * (1 + j / n) for j in range(n)]
  values.append(1.0)
  return np.array(values, np.float32)


def code_map(signed: bool) -> np.ndarray:
  """All 256 values a code decodes to (code 255 is NaN), float32.

  :func:`encode` and :func:`decode` compute with the bit patterns instead;
  this table is their specification (the tests compare against it).
  """
  mags = magnitudes(signed)
  if signed:
    values = np.concatenate([-mags[:0:-1], mags])  # codes 0..254, 127 is zero
  else:
    values = mags                                  # codes 0..254
  assert len(values) == 255
  return np.append(values, np.float32(np.nan)).astype(np.float32)


def _center(signed: bool) -> int:
  return len(magnitudes(True)) - 1 if signed else 0


def encode(y: Array, signed: bool, bits: Optional[Array] = None) -> Array:
  """Codes (uint8) of values ``y`` already divided by their block's scale.

  Args:
    y: float32 values in [-1, 1] (signed) or [0, 1] (unsigned); values
      outside are clipped; non-finite values get :data:`NAN_CODE`.
    signed: which code map.
    bits: uniform uint32 random bits of ``y.shape`` for stochastic rounding
      (the top 16 are used), or None to round to the nearest code.

  Returns:
    uint8 codes of ``y.shape``.
  """
  n_octaves = len(_SIGNED_OCTAVES if signed else _UNSIGNED_OCTAVES)
  a = jnp.abs(y) if signed else jnp.maximum(y, 0.0)
  a = jnp.minimum(a, 1.0)
  raw = jax.lax.bitcast_convert_type(a, jnp.uint32)
  exponent = (raw >> 23).astype(jnp.int32)         # 126 for [1/2, 1)
  mantissa = raw & np.uint32(0x7FFFFF)
  octave = jnp.clip(126 - exponent, 0, n_octaves - 1)
  b = jnp.zeros_like(raw)
  start = jnp.zeros_like(raw)
  for k0, _, log2_n, first in _segments(signed):
    # Going down one octave inside a run moves 2^b magnitude indices down.
    inside = octave >= k0
    b = jnp.where(inside, np.uint32(log2_n), b)
    run_start = (np.int32(first)
                 - ((octave - k0) << log2_n)).astype(jnp.uint32)
    start = jnp.where(inside, run_start, start)
  if bits is None:
    uniform = jnp.full(a.shape, np.uint32(1 << 15))  # a half: nearest
  else:
    uniform = bits >> 16
  # Point index within the octave: floor(fraction · 2^b + uniform), in
  # integers. A carry to 2^b lands on the next octave's first point, which is
  # exactly the value 2^-k.
  shift = np.uint32(23) - b
  in_octave = ((mantissa >> np.uint32(7)) + (uniform >> b)) >> (shift - 7)
  index = start + in_octave
  # Below the lowest octave the points are 0 and 2^-K: round between them.
  lowest = np.float32(2.0**-n_octaves)
  up = a * np.float32(65536.0 / lowest) >= uniform.astype(jnp.float32) + 0.5
  index = jnp.where(exponent < 127 - n_octaves, up.astype(jnp.uint32), index)
  index = jnp.where(a >= 1.0, np.uint32(len(magnitudes(signed)) - 1), index)
  if signed:
    center = np.uint32(_center(True))
    code = jnp.where(y < 0, center - index, center + index)
  else:
    code = index
  code = jnp.where(jnp.isfinite(y), code, np.uint32(NAN_CODE))
  return code.astype(jnp.uint8)


def decode(codes: Array, signed: bool) -> Array:
  """The float32 values in [-1, 1] or [0, 1] of uint8 ``codes``."""
  c = codes.astype(jnp.int32)
  if signed:
    index = jnp.abs(c - _center(True))
    sign = jnp.where(c < _center(True), np.uint32(1 << 31), np.uint32(0))
  else:
    index = c
    sign = np.uint32(0)
  raw = jnp.zeros(c.shape, jnp.uint32)
  for k0, count, log2_n, first in reversed(_segments(signed)):
    # The run's lowest octave starts at magnitude index ``bottom``.
    bottom = first - (count - 1) * 2**log2_n
    offset = index - bottom
    octave = (k0 + count - 1) - (offset >> log2_n)
    point = (offset & (2**log2_n - 1)).astype(jnp.uint32)
    value = (((126 - octave).astype(jnp.uint32) << 23)
             | (point << np.uint32(23 - log2_n)))
    raw = jnp.where(index >= bottom, value, raw)
  values = jax.lax.bitcast_convert_type(raw | sign, jnp.float32)
  return jnp.where(c == NAN_CODE, np.float32(np.nan), values)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedMoment:
  """One moment leaf stored block-wise in 8 bits.

  A pytree node: ``codes`` and ``scales`` are its children (so ``jit``,
  ``eval_shape`` and orbax see two arrays); ``shape`` and ``signed`` are
  static.

  Attributes:
    codes: uint8 array ``(n_blocks, block_size)``, indices into the code map.
    scales: float32 array ``(n_blocks,)``, the largest finite |value| of each
      block (the last block is zero-padded).
    shape: the shape of the moment it stands for.
    signed: first moment (signed code) or second moment (unsigned code).
    stochastic: how it is rounded when stored again (see
      :class:`BlockwiseInt8`).
  """

  codes: Array
  scales: Array
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  signed: bool = dataclasses.field(metadata=dict(static=True))
  stochastic: bool = dataclasses.field(default=True,
                                       metadata=dict(static=True))

  @property
  def dtype(self):
    return jnp.dtype(jnp.float32)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  @property
  def block_size(self) -> int:
    return self.codes.shape[-1]

  @property
  def nbytes(self) -> int:
    return int(self.codes.size * 1 + self.scales.size * 4)


@dataclasses.dataclass(frozen=True)
class BlockwiseInt8:
  """The ``"int8"`` storage format, with its two knobs.

  Pass an instance as ``mu_dtype`` / ``nu_dtype`` of any jadam optimizer;
  the string ``"int8"`` means ``BlockwiseInt8()``.

  Attributes:
    block_size: elements per block sharing one float32 scale (Dettmers et
      al. use 2048 for their CUDA kernels, 256 in the paper's ablations;
      smaller blocks isolate outliers better and cost 4/block_size extra
      bytes per element).
    min_size: leaves with fewer elements are stored in float32.
    stochastic: round to a random neighbouring code (unbiased), or to the
      nearest one (as the paper).

  Example:
    >>> import jadam
    >>> opt = jadam.adam(1e-3, mu_dtype=jadam.BlockwiseInt8(block_size=128),
    ...                  nu_dtype="int8")
  """

  block_size: int = 256
  min_size: int = 4096
  stochastic: bool = True

  def __post_init__(self):
    if not (isinstance(self.block_size, int) and self.block_size > 0):
      raise ValueError(f"block_size must be a positive int, got "
                       f"{self.block_size!r}.")
    if not (isinstance(self.min_size, int) and self.min_size >= 0):
      raise ValueError(f"min_size must be an int >= 0, got {self.min_size!r}.")

  def applies_to(self, size: int) -> bool:
    return size >= max(self.min_size, 1)

  def n_blocks(self, size: int) -> int:
    return -(-size // self.block_size)


def block_scales(x: Array) -> Array:
  """The largest finite |x| along the last axis, with 1 for all-zero blocks."""
  finite = jnp.where(jnp.isfinite(x), jnp.abs(x), 0.0)
  # A tree of elementwise maxima of halves rather than a reduce: XLA:CPU
  # materialises the input of a reduction, but fuses this whole tree into its
  # producer, so decode → update → scale → encode never writes a float32 copy
  # of a whole moment (see docs/memory.md for the compiled memory check).
  while finite.shape[-1] > 1 and finite.shape[-1] % 2 == 0:
    half = finite.shape[-1] // 2
    finite = jnp.maximum(finite[..., :half], finite[..., half:])
  scale = jnp.max(finite, axis=-1)
  return jnp.where(scale > 0, scale, jnp.float32(1.0))


def quantize_blocks(x: Array, signed: bool,
                    bits: Optional[Array] = None) -> tuple[Array, Array]:
  """Codes and scales of float32 tiles ``x`` of shape ``(..., block)``."""
  scale = block_scales(x)
  y = x / scale[..., None]
  return encode(y, signed, bits), scale


def dequantize_blocks(codes: Array, scales: Array, signed: bool) -> Array:
  """float32 tiles ``(..., block)`` from codes and per-block scales."""
  return decode(codes, signed) * scales[..., None]


def to_blocks(x: Array, block_size: int) -> Array:
  """``x`` flattened, zero-padded to whole blocks, as ``(n_blocks, block)``."""
  flat = x.reshape(-1)
  pad = -flat.size % block_size
  if pad:
    flat = jnp.pad(flat, (0, pad))
  return flat.reshape(-1, block_size)


def from_blocks(tiles: Array, shape: tuple[int, ...]) -> Array:
  """The inverse of :func:`to_blocks`."""
  size = int(np.prod(shape, dtype=np.int64))
  return tiles.reshape(-1)[:size].reshape(shape)


def quantize(x: Array, signed: bool, block_size: int = 256,
             bits: Optional[Array] = None) -> QuantizedMoment:
  """A whole float array as a :class:`QuantizedMoment` (for tests and tools).

  Args:
    x: the values (any float dtype; they are quantized from float32).
    signed: signed code (first moments) or unsigned (second moments, x >= 0).
    block_size: elements per block.
    bits: uint32 random bits of the padded ``(n_blocks, block_size)`` shape
      for stochastic rounding, or None for nearest.

  Returns:
    The :class:`QuantizedMoment`.

  Example:
    >>> import jax.numpy as jnp
    >>> from jadam import _quant
    >>> q = _quant.quantize(jnp.linspace(-1, 1, 1000), signed=True)
    >>> q.codes.shape, q.scales.shape
    ((4, 256), (4,))
  """
  codes, scales = quantize_blocks(
      to_blocks(x.astype(jnp.float32), block_size), signed, bits)
  return QuantizedMoment(codes, scales, tuple(x.shape), signed,
                         stochastic=bits is not None)


def dequantize(q: QuantizedMoment) -> Array:
  """The float32 array a :class:`QuantizedMoment` stands for."""
  return from_blocks(dequantize_blocks(q.codes, q.scales, q.signed), q.shape)

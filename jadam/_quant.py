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
  their own size rather than rounded to zero. First moments use int8 codes
  ``±index`` (so zero is code 0), second moments uint8 codes. The 256th code
  marks a non-finite value (NaN, ±inf), which decodes to NaN so that a
  poisoned moment stays visible instead of turning into a number.

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
import math
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
NAN_CODE = 255          # unsigned (uint8) code of a non-finite value
NAN_CODE_SIGNED = -128  # signed (int8) code of a non-finite value


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


def code_map(signed: bool) -> tuple[np.ndarray, np.ndarray]:
  """Every code and the value in [-1, 1] or [0, 1] it decodes to.

  A signed code is an int8 ``±index`` into :func:`magnitudes` (so 0 is zero),
  with -128 for non-finite values; an unsigned code is a uint8 ``index``,
  with 255 for non-finite values, which decode to NaN. :func:`encode` and
  :func:`decode` compute with bit patterns instead; this table is their
  specification (the tests compare against it).

  Returns:
    ``(codes, values)``: the 256 codes (int8 or uint8) and float32 values.
  """
  mags = magnitudes(signed)
  if signed:
    codes = np.arange(-128, 128).astype(np.int8)
    index = np.abs(codes.astype(np.int32))
    values = np.where(codes < 0, -1.0, 1.0) * mags[np.minimum(index, 127)]
    values[codes == NAN_CODE_SIGNED] = np.nan
  else:
    codes = np.arange(256).astype(np.uint8)
    values = np.append(mags, np.nan)
  return codes, values.astype(np.float32)


def encode(y: Array, signed: bool, bits: Optional[Array] = None) -> Array:
  """Codes of values ``y`` already divided by their block's scale.

  Args:
    y: float32 values in [-1, 1] (signed) or [0, 1] (unsigned); values
      outside are clipped; non-finite values get the NaN code.
    signed: which code map.
    bits: uniform uint32 random bits of ``y.shape`` for stochastic rounding
      (the top 16 are used), or None to round to the nearest code.

  Returns:
    int8 codes (signed) or uint8 codes (unsigned) of ``y.shape``.
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
  finite = jnp.isfinite(y)
  if signed:
    code = index.astype(jnp.int32)
    code = jnp.where(y < 0, -code, code)
    return jnp.where(finite, code, NAN_CODE_SIGNED).astype(jnp.int8)
  return jnp.where(finite, index, np.uint32(NAN_CODE)).astype(jnp.uint8)


def decode(codes: Array) -> Array:
  """The float32 values in [-1, 1] or [0, 1] of int8 or uint8 ``codes``."""
  signed = codes.dtype == jnp.int8
  c = codes.astype(jnp.int32)
  if signed:
    index = jnp.abs(c)
    sign = jnp.where(c < 0, np.uint32(1 << 31), np.uint32(0))
    nan = c == NAN_CODE_SIGNED
  else:
    index = c
    sign = np.uint32(0)
    nan = c == NAN_CODE
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
  return jnp.where(nan, np.float32(np.nan), values)


def code_dtype(signed: bool):
  """int8 codes for first moments (signed), uint8 for second moments."""
  return jnp.dtype(jnp.int8) if signed else jnp.dtype(jnp.uint8)


@dataclasses.dataclass(frozen=True)
class BlockwiseInt8:
  """The ``"int8"`` storage format, with its knobs.

  Pass an instance as ``mu_dtype`` / ``nu_dtype`` of any jadam optimizer;
  the string ``"int8"`` means ``BlockwiseInt8()``.

  A quantized moment takes two arrays in the optimizer state: its codes, an
  int8 (first moment) or uint8 (second moment) array of the parameter's
  shape, in the ``mu`` / ``nu`` field; and its float32 block scales, shape
  ``(n_blocks,)``, in the state's ``scales`` field. Blocks are runs of
  ``block_size`` consecutive elements of the flattened parameter, the last
  one possibly shorter.

  Attributes:
    block_size: elements per block sharing one float32 scale, a power of two
      (Dettmers et al. use 2048 in their CUDA kernels and study 256 and
      smaller; smaller blocks isolate outliers better and cost
      4/block_size extra bytes per element).
    min_size: parameters with fewer elements keep this moment in float32.
    stochastic: round to a random neighbouring code, unbiased (the default),
      or to the nearest one (as the paper).

  Example:
    >>> import jadam
    >>> opt = jadam.adam(1e-3, mu_dtype=jadam.BlockwiseInt8(block_size=128),
    ...                  nu_dtype="int8")
  """

  block_size: int = 256
  min_size: int = 4096
  stochastic: bool = True

  def __post_init__(self):
    if not (isinstance(self.block_size, int) and self.block_size > 0
            and self.block_size & (self.block_size - 1) == 0):
      raise ValueError("block_size must be a positive power of two (so that "
                       "a state's scales determine its blocks), got "
                       f"{self.block_size!r}.")
    if not (isinstance(self.min_size, int) and self.min_size >= 0):
      raise ValueError(f"min_size must be an int >= 0, got {self.min_size!r}.")

  def applies_to(self, size: int) -> bool:
    return size >= max(self.min_size, 1)

  def n_blocks(self, size: int) -> int:
    return -(-size // self.block_size)


def block_size_of(size: int, n_blocks: int) -> int:
  """The power-of-two block size that cuts ``size`` elements into
  ``n_blocks`` blocks (unique: different powers of two give different block
  counts unless one block holds everything)."""
  if n_blocks <= 1:
    return max(1, 1 << max(size - 1, 0).bit_length())
  return 1 << (-(-size // n_blocks) - 1).bit_length()


def block_scales(x: Array) -> Array:
  """The largest finite |x| along the last axis, with 1 for all-zero blocks."""
  finite = jnp.where(jnp.isfinite(x), jnp.abs(x), 0.0)
  scale = jnp.max(finite, axis=-1)
  return jnp.where(scale > 0, scale, jnp.float32(1.0))


def quantize_blocks(x: Array, signed: bool,
                    bits: Optional[Array] = None) -> tuple[Array, Array]:
  """Codes and scales of float32 tiles ``x`` of shape ``(..., block)``."""
  scale = block_scales(x)
  return encode(x / scale[..., None], signed, bits), scale


def dequantize_blocks(codes: Array, scales: Array) -> Array:
  """float32 tiles ``(..., block)`` from codes and per-block scales."""
  return decode(codes) * scales[..., None]


def to_blocks(x: Array, block_size: int, fill: float = 0) -> Array:
  """``x`` flattened, padded with ``fill`` to whole blocks, as
  ``(n_blocks, block)``."""
  flat = x.reshape(-1)
  pad = -flat.size % block_size
  if pad:
    flat = jnp.pad(flat, (0, pad), constant_values=fill)
  return flat.reshape(-1, block_size)


def from_blocks(tiles: Array, shape: tuple[int, ...]) -> Array:
  """The inverse of :func:`to_blocks`."""
  size = math.prod(shape)
  return tiles.reshape(-1)[:size].reshape(shape)


def quantize(x: Array, signed: bool, block_size: int = 256,
             bits: Optional[Array] = None) -> tuple[Array, Array]:
  """A whole float array as codes and block scales.

  Args:
    x: the values (any float dtype; they are quantized from float32).
    signed: signed code (first moments) or unsigned (second moments, x >= 0).
    block_size: elements per block.
    bits: uint32 random bits of ``x.shape`` for stochastic rounding, or None
      for nearest.

  Returns:
    ``(codes, scales)``: codes of ``x.shape`` (int8 if signed, else uint8)
    and float32 scales of shape ``(n_blocks,)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from jadam import _quant
    >>> codes, scales = _quant.quantize(jnp.linspace(-1, 1, 1000), signed=True)
    >>> codes.shape, codes.dtype, scales.shape
    ((1000,), dtype('int8'), (4,))
  """
  tiles = to_blocks(x.astype(jnp.float32), block_size)
  if bits is not None:
    bits = to_blocks(bits, block_size)
  codes, scales = quantize_blocks(tiles, signed, bits)
  return from_blocks(codes, x.shape), scales


def dequantize(codes: Array, scales: Array) -> Array:
  """The float32 array that ``codes`` and block ``scales`` stand for."""
  block = block_size_of(codes.size, scales.shape[0])
  return from_blocks(dequantize_blocks(to_blocks(codes, block), scales),
                     codes.shape)

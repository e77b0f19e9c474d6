"""Block-wise 8-bit storage of optimizer moments with dynamic code maps.

After Dettmers, Lewis, Shleifer & Zettlemoyer, "8-bit Optimizers via
Block-wise Quantization", ICLR 2022:

* A moment leaf is cut into blocks of ``block_size`` elements (256 by
  default); each block keeps one float32 scale, its largest finite |value|.
  An outlier then only costs precision inside its own block.
* Each element is stored as one byte: an index into a *dynamic* code map, a
  fixed table of values in [-1, 1] (first moment) or [0, 1] (second moment)
  spread over many binary orders of magnitude below the block's maximum, so
  that small values are kept relative to their own size rather than rounded
  to zero. First moments use int8 codes ``±index`` (so zero is code 0),
  second moments uint8 codes. One signed code marks NaN, which decodes to
  NaN so that a poisoned moment stays visible instead of turning into a
  number (an infinite first moment saturates to the top code). One unsigned
  code marks +inf: a finite gradient whose square overflows gives v = inf
  and a zero step for its element, as with float32 storage, while the
  block's scale, set without it, keeps its other elements intact. Second
  moments never round a positive value to
  zero: below the map's smallest point they keep that point, so that a tiny
  v next to an outlier in its block makes its element's step too small
  rather than divided by ε alone (the optimizer stores √v in these codes,
  so that takes a block-mate 3.5·10⁵ times smaller in gradient).

The code maps are ours, not the paper's base-10 "dynamic trees": tiny
floating-point formats. Each is two runs of binary octaves
``[2^-(k+1), 2^-k)`` with the same number of evenly spaced points in every
octave of a run: for the first moment 8 points per octave over the top 12
octaves, then 4 per octave down to 1.4·10⁻⁶ of the block maximum; for the
second, which :mod:`jadam._formats.int8` stores as √v (so that 12 decades of v
fit below a block's maximum), 32 per octave over the top 4 octaves, then 8
per octave down to 1.3·10⁻⁶. Because a run's
points are evenly spaced in float32 bit patterns, a magnitude index is the
bit pattern of its value minus a constant, shifted: encoding and decoding
are a few integer operations per element, with no table and no search.
Inside a run the relative step is the same in every octave, so a block
scale that is an upper bound somewhat above the block's true maximum (see
:mod:`jadam._formats.int8`) moves the block's values down the map without
coarsening them, as long as they stay in the top run.

Rounding is stochastic by default: the code above is chosen with probability
equal to the covered fraction of the gap, so stored moments are unbiased, and
a second moment multiplied by β2 = 0.999 decays in expectation instead of
rounding back to the same code forever.

Leaves with fewer than ``min_size`` elements (4096 by default) stay float32,
as in the paper: their bytes do not matter and they are often biases and norm
scales, where precision does.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Each code map is two runs of octaves with evenly spaced points, from 1.0
# downwards: (mantissa bits, index steps), 2^bits points per octave; the
# last run goes down to magnitude index 1. First moment: 8 points per octave
# over the top 12 octaves, then 4 per octave for 7.5 more. Second moment
# (stored as √v by jadam._formats.int8): 32 per octave over the top 4, then 8 per
# octave for 15.6 more.
_RUNS = {True: ((3, 96), (2, 30)), False: ((5, 128), (3, 125))}
_ONE_BITS = 0x3F800000  # float32 1.0
# The code of a non-finite value. Signed codes (first moments): NaN, which
# decodes to NaN (an infinity saturates to the top code instead). Unsigned
# codes (second moments): NaN or +inf, which decodes to +inf, as float32
# storage keeps v = inf (and a zero step) after a gradient whose square
# overflows.
NAN_CODE = 255
NAN_CODE_SIGNED = -128


def top_index(signed: bool) -> int:
  """The magnitude index of 1.0: 127 for int8 codes, 254 for uint8 codes."""
  return 127 if signed else 254


def _runs(signed: bool) -> list[tuple[int, int, int]]:
  """Per run, top first: (lowest index, bit shift, offset), such that the
  float32 bit pattern of index ``i`` in the run is ``offset + (i << shift)``.

  Adjacent runs share their boundary point, so a value rounded up past a
  run's last point lands on the next run's first, at the same value.
  """
  out, index, pattern = [], top_index(signed), _ONE_BITS
  for bits, steps in _RUNS[signed]:
    shift = 23 - bits
    lowest = index - steps
    out.append((lowest, shift, pattern - (index << shift)))
    pattern -= steps << shift
    index = lowest
  assert index == 1, "the runs must end at magnitude index 1"
  return out


def magnitudes(signed: bool) -> np.ndarray:
  """The non-negative values of a code map, index 0 (zero) to 1.0, float32."""
  values = np.zeros(top_index(signed) + 1, np.float32)
  upper = top_index(signed)
  for lowest, shift, offset in _runs(signed):
    index = np.arange(lowest, upper + 1, dtype=np.int64)
    values[lowest:upper + 1] = (offset + (index << shift)).astype(
        np.uint32).view(np.float32)
    upper = lowest
  return values


def code_map(signed: bool) -> tuple[np.ndarray, np.ndarray]:
  """Every code and the value in [-1, 1] or [0, 1] it decodes to.

  A signed code is an int8 ``±index`` into :func:`magnitudes` (so 0 is zero),
  with -128 for NaN (decodes to NaN); an unsigned code is a uint8
  ``index``, with 255 for NaN or +inf (decodes to +inf). :func:`encode` and
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
    values = np.append(mags, np.inf)
  return codes, values.astype(np.float32)


def encode(y: Array, signed: bool, bits: Optional[Array] = None,
           round_up: bool = False,
           positive: Optional[Array] = None) -> Array:
  """Codes of values ``y`` already divided by their block's scale.

  Second moments (unsigned codes) never round a positive value to zero: a
  value below the map's smallest point gets that point. A v flushed to
  zero would divide its element's step by ε alone (a block-mate of an
  outlier would step up to 10⁷ times too far, measured in docs/memory.md);
  kept at the smallest point its step is too small instead, never too large.

  Args:
    y: float32 values in [-1, 1] (signed) or [0, 1] (unsigned); finite
      values outside are clipped to the largest code. Signed: ±inf too, and
      NaN gets the NaN code. Unsigned: +inf and NaN get the code of +inf.
    signed: which code map.
    bits: uniform uint32 random bits of ``y.shape`` for stochastic rounding
      (the top 24 are used), or None to round to the nearest code.
    round_up: round every value up to the next code instead (for AMSGrad's
      running maximum, which must never decrease); ``bits`` is then unused.
    positive: for unsigned codes, where the value before scaling was > 0:
      those get at least the smallest point even if ``y`` underflowed to
      zero (XLA:CPU flushes subnormal floats to zero).

  Returns:
    int8 codes (signed) or uint8 codes (unsigned) of ``y.shape``.
  """
  a = jnp.abs(y) if signed else jnp.maximum(y, 0.0)
  a = jnp.minimum(a, 1.0)
  raw = jax.lax.bitcast_convert_type(a, jnp.uint32)
  if round_up:
    bits = None
  if bits is None:
    uniform = np.float32(0.5)
  else:
    uniform = (bits >> np.uint32(8)).astype(jnp.float32) * np.float32(2.0**-24)
  # Below index 1 the neighbours are 0 and the value of index 1: first
  # moments round between them (``uniform < fraction`` is never true for
  # a = 0, so zero stays zero); second moments take index 1 if positive.
  smallest = magnitudes(signed)[1]
  if signed and not round_up:
    index = (a * np.float32(1 / smallest) > uniform).astype(jnp.uint32)
  else:
    above_zero = a > 0
    if positive is not None and not signed:
      above_zero = jnp.logical_or(above_zero, positive)
    index = above_zero.astype(jnp.uint32)
  # Inside a run the points are evenly spaced in bit patterns, so adding
  # ``carry`` (a uniform fraction of one step, or half a step) and truncating
  # rounds up with probability equal to the covered fraction of the gap.
  # 1.0 is index ``top_index``: no clip is needed.
  for lowest, shift, offset in reversed(_runs(signed)):
    if round_up:
      carry = np.uint32((1 << shift) - 1)
    elif bits is None:
      carry = np.uint32(1 << (shift - 1))
    else:
      carry = bits >> np.uint32(32 - shift)
    start = np.uint32(offset + (lowest << shift))  # pattern of ``lowest``
    in_run = (raw - np.uint32(offset) + carry) >> np.uint32(shift)
    index = jnp.where(raw >= start, in_run, index)
  if signed:
    # Only NaN is marked; an infinite first moment saturates to the top code.
    code = index.astype(jnp.int32)
    code = jnp.where(y < 0, -code, code)
    return jnp.where(jnp.isnan(y), NAN_CODE_SIGNED, code).astype(jnp.int8)
  # A second moment that is +inf (or NaN) is kept as +inf.
  return jnp.where(jnp.isfinite(y), index,
                   np.uint32(NAN_CODE)).astype(jnp.uint8)


def decode(codes: Array) -> Array:
  """The float32 values in [-1, 1] or [0, 1] of int8 or uint8 ``codes``."""
  signed = codes.dtype == jnp.int8
  c = codes.astype(jnp.int32)
  if signed:
    index = jnp.abs(c).astype(jnp.uint32)
    nan = c == NAN_CODE_SIGNED
  else:
    index = c.astype(jnp.uint32)
    nan = c == NAN_CODE
  raw = jnp.zeros(c.shape, jnp.uint32)
  for lowest, shift, offset in reversed(_runs(signed)):
    pattern = (index << np.uint32(shift)) + np.uint32(offset)
    raw = jnp.where(index >= lowest, pattern, raw)
  if signed:
    raw = raw | jnp.where(c < 0, np.uint32(1 << 31), np.uint32(0))
  values = jax.lax.bitcast_convert_type(raw, jnp.float32)
  return jnp.where(nan, np.float32(np.nan if signed else np.inf), values)


def code_dtype(signed: bool):
  """int8 codes for first moments (signed), uint8 for second moments."""
  return jnp.dtype(jnp.int8) if signed else jnp.dtype(jnp.uint8)


def block_size_of(size: int, n_blocks: int) -> int:
  """The power-of-two block size that cuts ``size`` elements into
  ``n_blocks`` blocks (unique: different powers of two give different block
  counts unless one block holds everything)."""
  if n_blocks <= 1:
    return max(1, 1 << max(size - 1, 0).bit_length())
  return 1 << (-(-size // n_blocks) - 1).bit_length()


# The largest block scale: its reciprocal, 2^-126, is still a normal float32
# (XLA:CPU flushes subnormals to zero, and inf · 0 would be NaN).
MAX_SCALE = np.float32(2.0**126)


def block_scales(x: Array) -> Array:
  """The largest finite |x| along the last axis (at most
  :data:`MAX_SCALE`), with 1 for all-zero blocks."""
  magnitude = jnp.where(jnp.isfinite(x), jnp.abs(x), 0.0)
  scale = jnp.minimum(jnp.max(magnitude, axis=-1), MAX_SCALE)
  return jnp.where(scale > 0, scale, jnp.float32(1.0))


def quantize_blocks(x: Array, signed: bool,
                    bits: Optional[Array] = None) -> tuple[Array, Array]:
  """Codes and scales of float32 tiles ``x`` of shape ``(..., block)``."""
  scale = block_scales(x)
  return encode(x / scale[..., None], signed, bits,
                positive=None if signed else x > 0), scale


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
    >>> from jadam._formats import _codes
    >>> codes, scales = _codes.quantize(jnp.linspace(-1, 1, 1000), signed=True)
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

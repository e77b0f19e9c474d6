"""Block-wise 8-bit codes of moments, with dynamic code maps.

After Dettmers, Lewis, Shleifer & Zettlemoyer, "8-bit Optimizers via
Block-wise Quantization", ICLR 2022 (arXiv:2110.02861): one float32 scale per
block (its largest finite |value|) confines an outlier to its block; a byte
per element indexes a map of values in [-1, 1] (m, int8) or [0, 1] (√v,
uint8) spread over many octaves. Our maps are tiny float formats, not the
paper's dynamic trees: two runs of evenly spaced octaves (``_RUNS``), so
coding is integer arithmetic on float32 bit patterns, and a scale above a
block's maximum moves values down the top run without coarsening them.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Keyed by ``signed``: runs from 1.0 down to magnitude index 1, as (mantissa
# bits, index steps), 2^bits points per octave.
_RUNS = {True: ((3, 96), (2, 30)), False: ((5, 128), (3, 125))}
_ONE_BITS = 0x3F800000  # float32 1.0
# Non-finite codes. Signed: NaN only (±inf saturates). Unsigned: NaN and +inf,
# decoded to +inf, as float32 keeps v = inf (a zero step) when g² overflows.
NAN_CODE = 255
NAN_CODE_SIGNED = -128


def top_index(signed: bool) -> int:
  return 127 if signed else 254


def _runs(signed: bool) -> list[tuple[int, int, int]]:
  """Per run, top first: (lowest index, shift, offset), index ``i`` having
  the bit pattern ``offset + (i << shift)``; adjacent runs share a point."""
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
  """``(codes, values)``: all 256 codes and their float32 values, the table
  that ``encode`` and ``decode`` must agree with (the tests compare)."""
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
  """Codes of ``y`` (values over their block's scale, clipped to the map).

  ``bits``: uniform uint32 of ``y.shape`` (top 24 used), or None for nearest;
  ``round_up`` for AMSGrad's maximum, which must never decrease. A positive v
  never rounds to zero, which would divide its step by ε alone; ``positive``
  marks those that flushed to zero on scaling (XLA:CPU flushes subnormals).
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
  # Below index 1, m rounds between 0 and index 1; v > 0 takes index 1.
  smallest = magnitudes(signed)[1]
  if signed and not round_up:
    index = (a * np.float32(1 / smallest) > uniform).astype(jnp.uint32)
  else:
    above_zero = a > 0
    if positive is not None and not signed:
      above_zero = jnp.logical_or(above_zero, positive)
    index = above_zero.astype(jnp.uint32)
  # Points are evenly spaced in bit patterns: adding a random (or half) step
  # and truncating rounds up with the right odds.
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
    code = index.astype(jnp.int32)
    code = jnp.where(y < 0, -code, code)
    return jnp.where(jnp.isnan(y), NAN_CODE_SIGNED, code).astype(jnp.int8)
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
  return jnp.dtype(jnp.int8) if signed else jnp.dtype(jnp.uint8)


def block_size_of(size: int, n_blocks: int) -> int:
  """The power-of-two block size giving ``n_blocks`` blocks of ``size``."""
  if n_blocks <= 1:
    return max(1, 1 << max(size - 1, 0).bit_length())
  return 1 << (-(-size // n_blocks) - 1).bit_length()


# The largest block scale: its reciprocal, 2^-126, is still a normal float32
# (XLA:CPU flushes subnormals to zero, and inf · 0 would be NaN).
MAX_SCALE = np.float32(2.0**126)


def block_scales(x: Array) -> Array:
  """The largest finite |x| per block (last axis), 1 for all-zero blocks."""
  magnitude = jnp.where(jnp.isfinite(x), jnp.abs(x), 0.0)
  scale = jnp.minimum(jnp.max(magnitude, axis=-1), MAX_SCALE)
  return jnp.where(scale > 0, scale, jnp.float32(1.0))


def quantize_blocks(x: Array, signed: bool,
                    bits: Optional[Array] = None) -> tuple[Array, Array]:
  scale = block_scales(x)
  return encode(x / scale[..., None], signed, bits,
                positive=None if signed else x > 0), scale


def dequantize_blocks(codes: Array, scales: Array) -> Array:
  return decode(codes) * scales[..., None]


def to_blocks(x: Array, block_size: int, fill: float = 0) -> Array:
  """``x`` flat, padded with ``fill`` to ``(n_blocks, block)``."""
  flat = x.reshape(-1)
  pad = -flat.size % block_size
  if pad:
    flat = jnp.pad(flat, (0, pad), constant_values=fill)
  return flat.reshape(-1, block_size)


def from_blocks(tiles: Array, shape: tuple[int, ...]) -> Array:
  size = math.prod(shape)
  return tiles.reshape(-1)[:size].reshape(shape)


def quantize(x: Array, signed: bool, block_size: int = 256,
             bits: Optional[Array] = None) -> tuple[Array, Array]:
  """A float array as ``(codes, scales)``: codes of ``x.shape`` and float32
  scales ``(n_blocks,)``; ``bits`` as in ``encode``."""
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

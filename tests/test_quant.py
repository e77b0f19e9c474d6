"""Block-wise 8-bit quantization (jadam._formats._codes): code maps and round
trips."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jadam
from jadam import _rounding
from jadam._formats import _codes as _quant


# Jitted once per signature: op-by-op dispatch of the bit manipulations is
# what would make these tests slow.
encode = jax.jit(_quant.encode, static_argnums=1, static_argnames="round_up")
decode = jax.jit(_quant.decode)
quantize = jax.jit(_quant.quantize, static_argnums=(1, 2))
dequantize = jax.jit(_quant.dequantize)


# Points per octave near the block maximum, and over how many octaves.
# Points per octave and octaves of the dense top run, and points per octave
# of the run below it (m: 8 over 12 octaves, then 4; the uint8 codes, which
# hold √v: 32 over 4 octaves, then 8).
DENSE = {True: (8, 12), False: (32, 4)}
COARSE = {True: 4, False: 8}


def _bits(shape, seed=7):
  return jax.jit(_rounding.random_bits, static_argnums=0)(
      shape, _rounding.salt(seed))


@pytest.mark.parametrize("signed", [True, False])
def test_code_map_is_sorted_distinct_and_spans_zero_to_one(signed):
  codes, values = _quant.code_map(signed)
  finite = values[np.isfinite(values)]
  assert len(finite) == 255 and len(np.unique(finite)) == 255
  # One code for a non-finite value: NaN for m, +inf for v.
  if signed:
    assert np.isnan(values).sum() == 1
  else:
    assert np.isposinf(values).sum() == 1 and not np.isnan(values).any()
  assert finite.max() == 1.0 and 0.0 in finite
  assert finite.min() == (-1.0 if signed else 0.0)
  # Zero is code 0, so zero-initialised codes are zero moments.
  assert values[codes == 0][0] == 0.0
  # Dynamic: the smallest non-zero magnitude is far below the block maximum,
  # and the points are denser near it: per octave, 8 (m) or 32 (√v) over the
  # top 12 (m) or 4 (√v) octaves, then 4 (m) or 8 (√v).
  mags = np.sort(finite[finite > 0])
  assert mags[0] < 2e-6
  ratios = mags[1:] / mags[:-1]
  top_points, dense_octaves = DENSE[signed]
  dense = mags[1:] > 2.0**-dense_octaves
  assert np.all(ratios[dense] <= 1 + 1 / top_points)
  assert np.all(ratios[~dense] <= 1 + 1 / COARSE[signed])
  assert np.all(ratios >= 1 + 1 / (2 * top_points))
  assert np.sum((mags >= 0.5) & (mags < 1)) == top_points


@pytest.mark.parametrize("signed", [True, False])
def test_decode_equals_the_code_map(signed):
  codes, values = _quant.code_map(signed)
  decoded = np.asarray(decode(jnp.asarray(codes)))
  np.testing.assert_array_equal(decoded, values)


@pytest.mark.parametrize("signed", [True, False])
def test_encode_rounds_to_the_nearest_code(signed):
  _, values = _quant.code_map(signed)
  finite = values[np.isfinite(values)]
  grid = np.concatenate([np.linspace(0, 1, 5001), np.geomspace(1e-9, 1, 5000),
                         finite, (finite[1:] + finite[:-1]) / 2 + 1e-9])
  if signed:
    grid = np.concatenate([grid, -grid])
  grid = np.clip(grid, -1, 1).astype(np.float32)
  decoded = np.asarray(decode(encode(jnp.asarray(grid), signed)))
  best = np.min(np.abs(grid[:, None] - finite[None, :]), axis=1)
  smallest = finite[finite > 0].min()
  floored = (grid > 0) & (grid < smallest) & (not signed)
  # No code is nearer than the chosen one (a tie may go either way) ...
  near = ~floored
  assert np.all(np.abs(decoded - grid)[near] <= best[near] * (1 + 1e-6)
                + 1e-12)
  # ... except that a positive second moment below the smallest point takes
  # that point, never zero (its step would otherwise be divided by ε alone).
  assert floored.sum() > 100 if not signed else not floored.any()
  np.testing.assert_array_equal(decoded[floored], smallest)


def test_second_moment_codes_never_round_a_positive_value_to_zero():
  # Including values that underflow once divided by their block scale.
  x = jnp.array([[1e-30, 1e-20, 0.0, 1.0]], jnp.float32)
  codes, scales = _quant.quantize_blocks(x * 1e30, signed=False)
  assert np.all(np.asarray(codes)[0, [0, 1, 3]] > 0)
  assert int(codes[0, 2]) == 0
  for bits in (None, jax.random.bits(jax.random.PRNGKey(0), (3,),
                                      jnp.uint32)):
    y = encode(jnp.array([1e-12, 1e-9, 0.0], jnp.float32), False, bits)
    np.testing.assert_array_equal(np.asarray(y), [1, 1, 0])


def test_non_finite_codes_of_first_and_second_moments():
  # m: an infinity saturates to the top code, NaN stays NaN. v: +inf (and
  # NaN) is kept as +inf, as float32 storage keeps an overflowed v.
  y = jnp.array([jnp.inf, jnp.nan, 0.5], jnp.float32)
  decoded = np.asarray(decode(encode(y, True)))
  assert decoded[0] == 1.0 and np.isnan(decoded[1]) and decoded[2] > 0
  decoded = np.asarray(decode(encode(y, False)))
  assert np.isposinf(decoded[0]) and np.isposinf(decoded[1])
  # The block scale is over the finite values: the others are kept.
  codes, scales = _quant.quantize_blocks(
      jnp.array([[jnp.inf, 1.0, 0.0, 2.0]]), signed=False)
  assert float(scales[0]) == 2.0
  decoded = np.asarray(_quant.dequantize_blocks(codes, scales))
  np.testing.assert_allclose(decoded[0, 1:], [1.0, 0.0, 2.0], rtol=0.05)
  assert np.isposinf(decoded[0, 0])


def test_round_up_never_decodes_below_the_value():
  grid = jnp.asarray(np.geomspace(1e-9, 1, 20000).astype(np.float32))
  decoded = np.asarray(decode(encode(grid, False, round_up=True)))
  assert np.all(decoded >= np.asarray(grid))


@pytest.mark.parametrize("signed", [True, False])
def test_every_code_value_round_trips_exactly(signed):
  codes, values = _quant.code_map(signed)
  finite = np.isfinite(values)
  back = encode(jnp.asarray(values[finite]), signed)
  np.testing.assert_array_equal(np.asarray(back), codes[finite])


def _blocks(x, block):
  return np.asarray(_quant.to_blocks(jnp.asarray(x), block))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("block", [64, 256])
def test_round_trip_error_is_bounded_per_block(signed, block):
  key = jax.random.PRNGKey(0)
  # Heavy-tailed values spanning several orders of magnitude, 1000 elements
  # (not a multiple of the block size).
  x = jax.random.t(key, 2.0, (1000,)) * jnp.exp(jax.random.normal(key, (1000,)))
  if not signed:
    x = jnp.abs(x)  # unsigned codes hold √v, which has the range of |g|
  codes, scales = quantize(x, signed, block)
  assert codes.shape == x.shape and scales.shape == (-(-1000 // block),)
  assert codes.dtype == (jnp.int8 if signed else jnp.uint8)
  y = np.asarray(dequantize(codes, scales))
  xb, yb = _blocks(x, block), _blocks(y, block)
  absmax = np.max(np.abs(xb), axis=1, keepdims=True)
  np.testing.assert_allclose(np.asarray(scales), absmax[:, 0], rtol=0)
  err = np.abs(yb - xb)
  # Every element within half a code step of the top octave.
  top_points, dense_octaves = DENSE[signed]
  assert np.all(err <= absmax / (4 * top_points) + 1e-12)
  # Relative to its own size, within half a step of its octave: 1/16 (m) or
  # 1/64 (√v) in the dense top octaves, 1/8 or 1/16 below, down to the
  # smallest code.
  rel = err / np.maximum(np.abs(xb), 1e-30)
  dense = np.abs(xb) >= absmax * 2.0**-dense_octaves
  in_range = np.abs(xb) >= absmax * _quant.magnitudes(signed)[1]
  assert np.all(rel[dense] <= 1 / (2 * top_points) + 1e-6)
  assert np.all(rel[in_range] <= 1 / (2 * COARSE[signed]) + 1e-6)
  assert np.mean(in_range) > 0.95
  # The block maximum itself is exact.
  np.testing.assert_array_equal(np.max(np.abs(yb), axis=1), absmax[:, 0])


def test_zeros_round_trip_exactly():
  x = jnp.zeros(700).at[300:350].set(jnp.linspace(-1, 1, 50))
  for signed in (True, False):
    codes, scales = quantize(x if signed else jnp.abs(x), signed, 256)
    y = np.asarray(dequantize(codes, scales))
    assert np.all(y[:256] == 0) and np.all(y[512:] == 0)
    assert np.all(y[x == 0] == 0)
    assert np.all(np.isfinite(np.asarray(scales)))


def test_a_huge_outlier_costs_precision_only_in_its_block():
  x = jax.random.normal(jax.random.PRNGKey(1), (1024,))
  spiked = x.at[300].set(1e30)
  codes, scales = quantize(x, True, 256)
  codes_s, scales_s = quantize(spiked, True, 256)
  y, y_s = dequantize(codes, scales), dequantize(codes_s, scales_s)
  # Other blocks are bit-for-bit what they were without the outlier.
  others = np.r_[0:256, 512:1024]
  np.testing.assert_array_equal(np.asarray(y_s)[others], np.asarray(y)[others])
  assert float(y_s[300]) == pytest.approx(1e30, rel=1e-7)
  assert np.all(np.isfinite(np.asarray(y_s)))


def test_nan_decodes_to_nan_and_leaves_the_block_intact():
  x = jnp.linspace(-2.0, 2.0, 512)
  codes, scales = quantize(x.at[10].set(np.nan), True, 256)
  y = np.asarray(dequantize(codes, scales))
  assert np.isnan(y[10])
  # The scale leaves NaN out, so the rest of the block is unaffected.
  assert float(scales[0]) == pytest.approx(float(np.max(np.abs(x[:256]))))
  mask = np.arange(512) != 10
  assert np.all(np.isfinite(y[mask]))
  np.testing.assert_allclose(y[mask], np.asarray(x)[mask], rtol=0.07, atol=1e-6)


@pytest.mark.parametrize("bad", [np.inf, -np.inf])
def test_an_infinite_first_moment_saturates_and_leaves_its_block_intact(bad):
  x = jnp.linspace(-2.0, 2.0, 512)
  codes, scales = quantize(x.at[10].set(bad), True, 256)
  y = np.asarray(dequantize(codes, scales))
  assert float(scales[0]) == pytest.approx(float(np.max(np.abs(x[:256]))))
  assert y[10] == np.sign(bad) * float(scales[0])
  assert np.all(np.isfinite(y))
  mask = np.arange(512) != 10
  np.testing.assert_allclose(y[mask], np.asarray(x)[mask], rtol=0.07,
                             atol=1e-6)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("value", [0.30001, 0.7777, 3e-3, 2e-8])
def test_stochastic_rounding_is_unbiased(signed, value):
  n = 1 << 16
  y = jnp.full((n,), value, jnp.float32)
  decoded = decode(encode(y, signed, _bits((n,))))
  smallest = _quant.magnitudes(signed)[1]
  if not signed and value < smallest:
    # Second moments below the smallest point take it (never zero).
    np.testing.assert_array_equal(np.asarray(decoded), smallest)
    return
  # Exactly two neighbouring codes are used, with the right frequencies.
  assert len(np.unique(np.asarray(decoded))) <= 2
  mean = float(jnp.mean(decoded))
  spread = float(jnp.max(decoded) - jnp.min(decoded))
  assert abs(mean - value) <= 4 * spread / np.sqrt(n) + 1e-12


def test_block_size_is_recovered_from_the_number_of_scales():
  for size in [1, 5, 255, 256, 257, 1000, 4096, 10_001]:
    for block in [1, 2, 64, 256, 2048]:
      n_blocks = -(-size // block)
      recovered = _quant.block_size_of(size, n_blocks)
      # Same partition: same block count, and the same cut points.
      assert -(-size // recovered) == n_blocks
      if n_blocks > 1:
        assert recovered == block


@pytest.mark.parametrize("block_size", [0, 100, -256, 2.0])
def test_block_size_must_be_a_power_of_two(block_size):
  with pytest.raises(ValueError, match="block_size"):
    jadam.BlockwiseInt8(block_size=block_size)


def test_min_size_must_be_non_negative():
  with pytest.raises(ValueError, match="min_size"):
    jadam.BlockwiseInt8(min_size=-1)

"""Stochastic rounding, and the random streams of narrow moments.

Rounding up with probability equal to the covered fraction of the gap keeps
updates below a format's spacing in expectation (Gupta et al., ICML 2015).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jadam import _boxes
from jadam import _compat
from jadam import _fusion
from jadam import _probe

Array = jax.Array

# The murmur3 finaliser's multipliers, the golden ratio φ (odd) and φ⁻¹.
_MIX1 = np.uint32(0x85EBCA6B)
_MIX2 = np.uint32(0xC2B2AE35)
_GOLDEN = np.uint32(0x9E3779B9)
_GOLDEN_INVERSE = np.uint32(0x144cbc89)


def _mix32(x: Array) -> Array:
  """The murmur3 finaliser: a bijective avalanche of uint32 values."""
  x = x ^ (x >> 16)
  x = x * _MIX1
  x = x ^ (x >> 13)
  x = x * _MIX2
  return x ^ (x >> 16)


def salt(*parts: Any) -> Array:
  """One salt from integers (Python or traced int32/uint32 scalars)."""
  h = jnp.uint32(0x6A09E667)
  for part in parts:
    h = _mix32(h ^ (jnp.asarray(part).astype(jnp.uint32) * _GOLDEN))
  return h


def remix(bits: Array) -> Array:
  return _mix32(bits ^ np.uint32(0x5BD1E995))


def uint32(value: int) -> np.uint32:
  return np.uint32(int(value) % (1 << 32))


def random_bits(shape: tuple[int, ...], seed: Array, offset: Any = 0) -> Array:
  """Uniform uint32 bits of ``shape``: element i is ``(i + offset)·φ + seed``
  modulo 2^32, so a tile at ``offset`` draws what the whole array would."""
  size = int(np.prod(shape, dtype=np.int64))
  index = jax.lax.iota(jnp.uint32, size).reshape(shape)
  if isinstance(offset, int):
    offset = uint32(offset)
  # A Weyl sequence, not a hash: one multiply-add. Uniform over seeds for
  # each element (so unbiased); the bottom 16 bits are one too. Written
  # (i + offset + seed·φ⁻¹)·φ so the per-step value is a scalar for all.
  if not (isinstance(offset, (int, np.integer)) and offset == 0):
    index = index + jnp.asarray(offset).astype(jnp.uint32)
  return (index + jnp.asarray(seed).astype(jnp.uint32) * _GOLDEN_INVERSE
          ) * _GOLDEN


def leaf_seed(t: Array, stream: Any) -> tuple[Array, Array]:
  """``(shared, shift)``: the step's stream, shifted per leaf, kept apart so
  that leaves of one shape share their compiled loops."""
  return salt(t), salt(t, stream)


def bits(shape: tuple[int, ...], seed: tuple[Array, Array],
          offset: Any) -> Array:
  """The random bits of a leaf (see ``leaf_seed``)."""
  shared, shift = seed
  return random_bits(shape, shared, offset) + shift


def shard_offset(g: Array) -> Any:
  """This shard's start in the array's random stream under shard_map; 0 for
  replicated leaves (copies must round alike) and under check_vma=False."""
  varying = _compat.varying_axes(g)
  if not varying:
    return 0
  mesh_axes = _compat.abstract_mesh_axis_names()
  names = tuple(a for a in mesh_axes if a in varying)
  shard = jax.lax.axis_index(names if len(names) > 1 else names[0])
  return shard.astype(jnp.uint32) * uint32(g.size)


def own_inputs(tree: Any, shape: tuple[int, ...], seed: tuple, offset: Any,
                tag: int) -> tuple[Any, list[Array]]:
  """``tree`` and bit streams, opaque (``_fusion.separate``) so that one
  moment's loop shares nothing with the other loops."""
  tree, zero = _fusion.separate(tree, tag)
  if not isinstance(zero, int):
    offset = zero + (uint32(offset) if isinstance(offset, int)
                     else offset)
  return tree, list(streams(bits(shape, seed, offset)))


def streams(bits: Optional[Array]):
  """Bits for m (top 16), v (bottom 16) and a third moment (a hash)."""
  if bits is None:
    return None, None, None
  return bits, bits << 16, remix(bits)


def _float16_neighbour(nearest: Array, x: Array, near32: Array) -> Array:
  """The float16 next to ``nearest`` on the side of ``x``, by integer steps
  of the bit pattern. Not ``jnp.nextafter``: XLA:GPU computes it in float32,
  which rounds back to ``nearest`` and silently rounds to nearest."""
  raw = jax.lax.bitcast_convert_type(nearest, jnp.uint16)
  sign = raw & np.uint16(0x8000)
  magnitude = raw & np.uint16(0x7FFF)
  away = jnp.abs(x) > jnp.abs(near32)  # the neighbour is farther from 0
  stepped = jnp.where(away, magnitude + np.uint16(1),
                      magnitude - np.uint16(1))
  # From ±0 the neighbour is the smallest subnormal on x's side.
  x_sign = jnp.where(x < 0, np.uint16(0x8000), np.uint16(0))
  other = jnp.where(magnitude == 0, x_sign | np.uint16(1), sign | stepped)
  return jax.lax.bitcast_convert_type(other.astype(jnp.uint16), jnp.float16)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def round_stochastic(x: Array, dtype: Any, bits: Array) -> Array:
  """Round float32 ``x`` to ``dtype`` (bfloat16 or float16), unbiasedly.

  Up with probability equal to the covered fraction of the gap, using the
  uniform uint32 ``bits``; NaN and ±inf are kept. The derivative is the
  identity, as for a cast (the bit arithmetic's, zero, would be wrong).
  """
  dtype = jnp.dtype(dtype)
  x = x.astype(jnp.float32)
  if dtype == jnp.float32:
    return x
  if dtype == jnp.bfloat16:
    # bfloat16 is the upper half of a float32: adding 16 random bits below
    # the cut and truncating rounds up with the right odds, in integers only
    # (a float32 → bfloat16 conversion is emulated on most CPUs).
    raw = jax.lax.bitcast_convert_type(x, jnp.uint32)
    rounded = (raw + (bits >> 16)) >> 16
    # ±inf and NaN are truncated instead (a NaN keeps its quiet bit set).
    exponent_all_ones = (raw & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
    kept = (raw >> 16) | jnp.where(raw & np.uint32(0x7FFFFF),
                                   np.uint32(0x40), np.uint32(0))
    upper = jnp.where(exponent_all_ones, kept, rounded).astype(jnp.uint16)
    return jax.lax.bitcast_convert_type(upper, jnp.bfloat16)
  if dtype == jnp.float16:
    # Pick the nearest value or its neighbour across x, by distance.
    nearest = x.astype(dtype)
    near32 = nearest.astype(jnp.float32)
    other = _float16_neighbour(nearest, x, near32)
    other32 = other.astype(jnp.float32)
    gap = jnp.abs(other32 - near32)
    p_other = jnp.where(gap > 0, jnp.abs(x - near32) / gap, 0.0)
    uniform = (bits >> 8).astype(jnp.float32) * np.float32(2.0**-24)
    rounded = jnp.where(uniform < p_other, other, nearest)
    return jnp.where(jnp.isfinite(x) & jnp.isfinite(near32), rounded, nearest)
  raise ValueError(f"stochastic rounding to {dtype} is not defined; use "
                   "bfloat16 or float16.")


@round_stochastic.defjvp
def _round_stochastic_jvp(dtype, primals, tangents):
  x, bits = primals
  x_dot, _ = tangents
  rounded = round_stochastic(x, dtype, bits)
  return rounded, jnp.asarray(x_dot, jnp.float32).astype(rounded.dtype)


class StochasticRoundingState(NamedTuple):
  """State of ``stochastic_rounding``: ``key`` of the next step's bits."""

  key: jax.Array


def stochastic_rounding(seed: int | jax.Array = 0
                        ) -> optax.GradientTransformation:
  """Round each low-precision parameter's new value stochastically.

  Place it last in a chain. For bfloat16 and float16 parameters it rounds
  ``θ + u`` stochastically and returns the float32 update that
  ``optax.apply_updates`` turns into exactly that value, so updates below
  the dtype's spacing are not lost. Wider parameters pass through.

  Args:
    seed: an int or a ``jax.random`` key; the bits depend on it and the step.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` needs
    ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, jadam
    >>> params = {"w": jnp.ones(4, jnp.bfloat16)}
    >>> opt = optax.chain(jadam.adam(1e-3), jadam.stochastic_rounding(seed=0))
    >>> state = opt.init(params)
    >>> u, state = opt.update({"w": jnp.ones(4, jnp.bfloat16)}, state, params)
    >>> optax.apply_updates(params, u)["w"].dtype
    dtype(bfloat16)

  References:
    Gupta, Agrawal, Gopalakrishnan & Narayanan, "Deep Learning with Limited
    Numerical Precision", ICML 2015.
  """

  def init_fn(params):
    del params
    if isinstance(seed, int):
      return StochasticRoundingState(jax.random.PRNGKey(seed))
    return StochasticRoundingState(jnp.asarray(seed))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("stochastic_rounding needs the parameters: call "
                       "update(updates, state, params).")
    key, step_key = jax.random.split(state.key)
    step_seed = jax.random.bits(step_key, (), jnp.uint32)
    leaves, treedef = jax.tree.flatten(updates)
    param_leaves = treedef.flatten_up_to(params)
    probe = _probe.read(extra_args)
    if probe is not None:
      # The update before rounding: what is lost is lost in expectation.
      probe.collect("rounding", _boxes.leaf_paths(updates),
                    [jnp.shape(u) for u in leaves],
                    lambda i: {"u": leaves[i], "p": param_leaves[i]})
    out = []
    for index, (u, p) in enumerate(zip(leaves, param_leaves)):
      if u is None or jnp.dtype(p.dtype) not in (jnp.bfloat16, jnp.float16):
        out.append(u)
        continue
      p32 = p.astype(jnp.float32)
      target = p32 + u.astype(jnp.float32)
      bits = random_bits(p.shape, salt(step_seed, index))
      rounded = round_stochastic(target, p.dtype, bits)
      # The difference of two nearby low-precision numbers is exact in
      # float32, so apply_updates lands exactly on ``rounded``.
      out.append(rounded.astype(jnp.float32) - p32)
    return treedef.unflatten(out), StochasticRoundingState(key)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

"""Stochastic rounding: keep the updates that round-to-nearest would erase.

A bfloat16 number has 8 significant bits, so near 1.0 its spacing is 2⁻⁷. An
Adam step of 1e-3 added to a bfloat16 parameter of size 1 rounds back to the
old value every time, and training stalls. Rounding *stochastically*, up with
probability equal to the distance already covered to the next representable
number, makes the stored value exact in expectation: many small steps add up
(Gupta et al., "Deep Learning with Limited Numerical Precision", ICML 2015).

The random bits come from a counter-based integer hash of (salt, element
index), computed inside the same fused loop as the rounding itself: cheaper on
CPU than drawing ``jax.random`` bits for every element, and reproducible from
the salt alone. Salts are derived from a ``jax.random`` key (the parameter
transformation below keeps one in its state) or, for moment storage, from the
step count and the leaf's position in its tree (:func:`leaf_seed`).
"""

from __future__ import annotations

import functools

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jadam import _compat
from jadam import _fusion

Array = jax.Array

# Odd multipliers of the murmur3 finaliser and the 32-bit golden ratio.
_MIX1 = np.uint32(0x85EBCA6B)
_MIX2 = np.uint32(0xC2B2AE35)
_GOLDEN = np.uint32(0x9E3779B9)
# φ·φ⁻¹ = 1 modulo 2^32.
_GOLDEN_INVERSE = np.uint32(0x144cbc89)


def _mix32(x: Array) -> Array:
  """A bijective avalanche of uint32 values (the murmur3 finaliser)."""
  x = x ^ (x >> 16)
  x = x * _MIX1
  x = x ^ (x >> 13)
  x = x * _MIX2
  return x ^ (x >> 16)


def salt(*parts: Any) -> Array:
  """Combine integers (Python or traced int32/uint32 scalars) into one salt."""
  h = jnp.uint32(0x6A09E667)
  for part in parts:
    h = _mix32(h ^ (jnp.asarray(part).astype(jnp.uint32) * _GOLDEN))
  return h


def remix(bits: Array) -> Array:
  """A second, independent-looking stream from existing random ``bits``."""
  return _mix32(bits ^ np.uint32(0x5BD1E995))


def uint32(value: int) -> np.uint32:
  """A Python integer modulo 2^32, as a uint32 constant."""
  return np.uint32(int(value) % (1 << 32))


def random_bits(shape: tuple[int, ...], seed: Array, offset: Any = 0) -> Array:
  """Uniform uint32 bits for every element of ``shape``.

  Args:
    shape: the shape of the output.
    seed: a uint32 scalar (see :func:`salt`).
    offset: added to the flat element index, so that a tile of a larger
      array draws the same bits as the whole array would at those elements.

  Returns:
    A uint32 array of ``shape``; element ``i`` is ``(i + offset)·φ + seed``
    modulo 2^32.
  """
  size = int(np.prod(shape, dtype=np.int64))
  index = jax.lax.iota(jnp.uint32, size).reshape(shape)
  if isinstance(offset, int):
    offset = uint32(offset)
  # A Weyl sequence: bits_i = i·φ + seed (φ the 32-bit golden ratio, odd).
  # One multiply and one add per element: in a step with int8 or bfloat16 moments this
  # runs once per element and moment, and a hash per element (the murmur3
  # finaliser, three more multiplies and shifts) cost 30% of the int8 moment
  # loops. Rounding needs no more: for a fixed element the bits are uniform
  # over seeds (adding the avalanched seed is a bijection), which makes every
  # rounding unbiased and independent across steps and leaves; the elements
  # of one step are spread evenly over [0, 2^32) rather than independently,
  # which spreads their rounding errors evenly too. The first moment uses the
  # top 16 bits and the second the bottom 16, which are again a Weyl
  # sequence (modulo 2^16, with an odd multiplier).
  # Computed as (i + offset + seed·φ⁻¹)·φ, the same number modulo 2^32 (φ is
  # odd, so it has an inverse), so that the only per-step value is one
  # scalar shared by every leaf.
  if not (isinstance(offset, (int, np.integer)) and offset == 0):
    index = index + jnp.asarray(offset).astype(jnp.uint32)
  return (index + jnp.asarray(seed).astype(jnp.uint32) * _GOLDEN_INVERSE
          ) * _GOLDEN


# ---------------------------------------------------------------------------
# The streams of moment storage: per step, per leaf, per shard, per moment.


def leaf_seed(t: Array, stream: Any) -> tuple[Array, Array]:
  """The rounding seed of a leaf's step, as ``(shared, shift)``: the bits
  are the step's one stream (seeded by ``t``, the same for every leaf) plus
  a per-leaf ``shift`` hashed from ``t`` and the leaf's position ``stream``
  (see :func:`bits`). A Weyl sequence plus a constant is the same sequence
  from another start, so this is a seed per leaf; kept apart, the shared
  part is computed once for all leaves of one shape: hashing the position
  into each leaf's seed made compiling 400 leaves of five shapes with
  bfloat16 moments several times slower."""
  return salt(t), salt(t, stream)


def bits(shape: tuple[int, ...], seed: tuple[Array, Array],
          offset: Any) -> Array:
  """The random bits of a leaf (see :func:`leaf_seed`)."""
  shared, shift = seed
  return random_bits(shape, shared, offset) + shift


def shard_offset(g: Array) -> Any:
  """Where this device's shard of ``g`` starts in the whole array's random
  stream inside ``jax.shard_map``: its linear index over the manual axes
  ``g`` is split over (in the mesh's order) times its size; 0 outside
  shard_map, for a replicated leaf (whose copies must round alike to stay
  replicated), and under ``check_vma=False``, which records no split."""
  varying = _compat.varying_axes(g)
  if not varying:
    return 0
  mesh_axes = _compat.abstract_mesh_axis_names()
  names = tuple(a for a in mesh_axes if a in varying)
  shard = jax.lax.axis_index(names if len(names) > 1 else names[0])
  return shard.astype(jnp.uint32) * uint32(g.size)


def own_inputs(tree: Any, shape: tuple[int, ...], seed: tuple, offset: Any,
                tag: int) -> tuple[Any, list[Array]]:
  """``tree`` made opaque with :func:`jadam._fusion.separate` under ``tag``,
  and the random-bit streams of ``shape`` drawn behind its offset of zero
  (the same bits as an ordinary draw at ``offset``), so that a loop
  computing one stored moment from them shares nothing with the other loops (see there)."""
  tree, zero = _fusion.separate(tree, tag)
  if not isinstance(zero, int):
    offset = zero + (uint32(offset) if isinstance(offset, int)
                     else offset)
  return tree, list(streams(bits(shape, seed, offset)))


def streams(bits: Optional[Array]):
  """Random bits for a leaf's first, second and third moments (m, v and
  max v̂ for the Adam family) from one draw per element: the first uses the
  top 16 bits, the second the bottom 16, and only a third moment pays for a
  hash of them."""
  if bits is None:
    return None, None, None
  return bits, bits << 16, remix(bits)


def _float16_neighbour(nearest: Array, x: Array, near32: Array) -> Array:
  """The float16 next to ``nearest`` on the side of ``x`` (float32), by
  integer steps of the bit pattern (sign and magnitude).

  Not ``jnp.nextafter``: XLA's GPU backend computes float16 arithmetic that
  has no native float16 instruction in float32 and rounds back, and
  nextafter of a float16 value taken in float32 rounds back to the value
  itself, so every element kept its nearest value and stochastic rounding
  silently became round-to-nearest there.
  """
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

  ``x`` becomes one of its two neighbours in ``dtype``, the upper one with
  probability equal to the fraction of the gap it has covered, so that
  ``E[result] = x``. NaN and ±inf are kept; values beyond the format's range
  overflow to ±inf, as with ordinary rounding.

  Its derivative is the identity (straight-through), as for an ordinary
  cast: the rounding is computed with bit casts and integer adds, whose
  derivative is zero, which made every moment stored this way a constant to
  ``jax.grad`` and meta-gradients through training silently wrong.

  Args:
    x: float32 values.
    dtype: the target floating dtype, narrower than float32.
    bits: uniform uint32 random bits of ``x.shape`` (see :func:`random_bits`).

  Returns:
    An array of ``dtype``.
  """
  dtype = jnp.dtype(dtype)
  x = x.astype(jnp.float32)
  if dtype == jnp.float32:
    return x
  if dtype == jnp.bfloat16:
    # bfloat16 is the upper half of a float32: adding 16 random bits below
    # the cut and truncating rounds the magnitude up with the right odds.
    # Integer operations only: a float32 → bfloat16 conversion is emulated on
    # most CPUs and costs several times more.
    raw = jax.lax.bitcast_convert_type(x, jnp.uint32)
    rounded = (raw + (bits >> 16)) >> 16
    # ±inf and NaN are truncated instead (a NaN keeps its quiet bit set).
    exponent_all_ones = (raw & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
    kept = (raw >> 16) | jnp.where(raw & np.uint32(0x7FFFFF),
                                   np.uint32(0x40), np.uint32(0))
    upper = jnp.where(exponent_all_ones, kept, rounded).astype(jnp.uint16)
    return jax.lax.bitcast_convert_type(upper, jnp.bfloat16)
  if dtype == jnp.float16:
    # No bit trick (the exponents differ): pick between the nearest value and
    # its neighbour on the other side of x, with probability by distance.
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
  """State of :func:`stochastic_rounding`.

  Attributes:
    key: the ``jax.random`` key the next step's random bits are drawn from.
  """

  key: jax.Array


def stochastic_rounding(seed: int | jax.Array = 0
                        ) -> optax.GradientTransformation:
  """Round each low-precision parameter's new value stochastically.

  Place this last in a chain, after the learning rate. For every bfloat16 or
  float16 parameter it computes ``θ + u`` in float32, rounds the sum
  stochastically to the parameter's dtype, and returns the float32 update
  that ``optax.apply_updates`` turns into exactly that value. Updates
  smaller than the dtype's spacing then move the parameter in expectation
  instead of being lost. Parameters of float32 or wider pass through.

  Args:
    seed: an int or a ``jax.random`` key; the stream of random bits is a
      function of it and the step, so runs are reproducible.

  Returns:
    An ``optax.GradientTransformation`` whose state is
    :class:`StochasticRoundingState`; ``update`` requires ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, jadam
    >>> params = {"w": jnp.ones(4, jnp.bfloat16)}
    >>> opt = optax.chain(jadam.adam(1e-3), jadam.stochastic_rounding(seed=0))
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": jnp.ones(4, jnp.bfloat16)}, state, params)
    >>> optax.apply_updates(params, updates)["w"].dtype
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

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("stochastic_rounding needs the parameters: call "
                       "update(updates, state, params).")
    key, step_key = jax.random.split(state.key)
    step_seed = jax.random.bits(step_key, (), jnp.uint32)
    leaves, treedef = jax.tree.flatten(updates)
    param_leaves = treedef.flatten_up_to(params)
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

  return optax.GradientTransformation(init_fn, update_fn)

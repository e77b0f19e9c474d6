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
  a bfloat16 decay factor. float16 keeps second moments as √v, because v
  itself under- and overflows float16.
* ``"int8"`` / :class:`jadam.BlockwiseInt8`: block-wise 8-bit codes with a
  float32 scale per block (:mod:`jadam._quant`); leaves below ``min_size``
  elements stay float32.
* These formats have no complex numbers, so a complex first moment stored in
  them is kept in the compute dtype (complex64 or wider).

Every moment is one array of its parameter's shape (values, √v, or codes),
so states stay plain trees of arrays for ``jit``, Flax NNX and orbax; int8
block scales are a separate tree (the state's ``scales`` field).
:func:`decode_moments` reads any state's moments back as float arrays.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp

from jadam import _fusion
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


def quantized(param: Any, storage: Storage, *, real: bool) -> bool:
  """Whether this moment of ``param`` is stored as int8 block codes."""
  if not isinstance(storage, _quant.BlockwiseInt8):
    return False
  if not real and jnp.issubdtype(param.dtype, jnp.complexfloating):
    return False  # a complex first moment has no 8-bit code: see init_moment
  return storage.applies_to(math.prod(param.shape))


def init_moment(param: Array, storage: Storage, *, real: bool) -> Array:
  """Zeros for one moment of one parameter in its storage format.

  Args:
    param: the parameter (or a ``jax.ShapeDtypeStruct``).
    storage: canonical storage dtype name, a :class:`~jadam.BlockwiseInt8`,
      or None to follow the parameter.
    real: the moment is of |g|² and so real even for complex parameters.

  Returns:
    An array of the parameter's shape: the moment, or its int8 / uint8 codes.
    bfloat16, float16 and int8 have no complex form, so a complex first
    moment stored in them is kept in the compute dtype instead.
  """
  if storage is None:
    dtype = real_dtype(param.dtype) if real else param.dtype
    return zeros(param, param.shape, dtype)
  compute = compute_dtype(param.dtype)
  if real:
    compute = real_dtype(compute)
  if isinstance(storage, _quant.BlockwiseInt8):
    if quantized(param, storage, real=real):
      return zeros(param, param.shape, _quant.code_dtype(signed=not real))
    # Small leaves stay in the compute dtype, as in Dettmers et al.
    return zeros(param, param.shape, compute)
  dtype = jnp.dtype(storage)
  if jnp.issubdtype(compute, jnp.complexfloating):
    dtype = (jnp.result_type(dtype, jnp.complex64) if dtype.itemsize >= 4
             else compute)
  return zeros(param, param.shape, dtype)


def init_scales(param: Array, storage: Storage, *, real: bool) -> Array:
  """The float32 block scales of an int8 moment, or a scalar placeholder
  (orbax cannot save empty arrays)."""
  if quantized(param, storage, real=real):
    n_blocks = storage.n_blocks(math.prod(param.shape))
    return zeros(param, (n_blocks,), jnp.float32)
  return zeros(param, (), jnp.float32)


def _is_codes(stored: Array) -> bool:
  return jnp.dtype(stored.dtype) in (jnp.int8, jnp.uint8)


def _is_root(stored: Array, root: bool) -> bool:
  # float16 cannot hold v = g² (it underflows below |g| ≈ 2.4e-4 and
  # overflows above |g| = 256); √v has the range of g itself.
  return root and jnp.dtype(stored.dtype) == jnp.float16


def load(stored: Array, dtype: Any, *, root: bool = False,
         scales: Optional[Array] = None) -> Array:
  """A stored moment as one array in the compute ``dtype``.

  Args:
    stored: the moment, its float16 square root, or its int8/uint8 codes.
    dtype: the compute dtype.
    root: the moment is a second moment (v, max v̂ or AdaMax's u), which
      float16 storage keeps as its square root.
    scales: the block scales, for codes.
  """
  if _is_codes(stored):
    return _quant.dequantize(stored, scales).astype(dtype)
  value = stored.astype(dtype)
  return value * value if _is_root(stored, root) else value


def store(value: Array, like: Array, bits: Optional[Array], *,
          root: bool = False) -> Array:
  """A float moment computed in the compute dtype, put back in ``like``'s
  format (codes are stored tile by tile, see :func:`_write`).

  Narrow formats round stochastically (unbiased), using the top 16 of the
  uint32 random ``bits`` (of ``value.shape``; None if ``like`` needs none):
  otherwise a second moment multiplied by β2 = 0.999 rounds back to its old
  bfloat16 value every step and never decays, and gradients smaller than the
  spacing of the stored first moment never enter it.
  """
  if _is_root(like, root):
    value = jnp.sqrt(value)
  if jnp.dtype(like.dtype).itemsize < 4:
    return _rounding.round_stochastic(value, like.dtype, bits)
  return value.astype(like.dtype)


def decode_moments(state: Any, dtype: Any = jnp.float32) -> _rule.Moments:
  """The moments of a jadam Adam-family state, as arrays whatever their
  storage.

  int8 codes are decoded with their block scales, float16 second moments
  squared back from √v, and everything cast to ``dtype`` (complex moments
  stay complex). Use it to log or inspect moments.

  Args:
    state: a :class:`~jadam.ScaleByAdamState` or
      :class:`~jadam.ScaleByAmsgradState` (find it inside a chain's state
      first, for example ``state[0]`` of ``jadam.adam``'s).
    dtype: float dtype of the result.

  Returns:
    ``Moments(mu, nu, nu_max)`` of trees with the parameters' structure
    (``nu_max`` is None except for AMSGrad).

  Example:
    >>> import jax.numpy as jnp, jadam
    >>> state = jadam.scale_by_adam(nu_dtype="int8").init({"w": jnp.ones(8192)})
    >>> state.nu["w"].dtype, jadam.decode_moments(state).nu["w"].dtype
    (dtype('uint8'), dtype('float32'))
  """
  scales = getattr(state, "scales", None)
  nu_max = getattr(state, "nu_max", None)

  def decode(tree, scale_tree, root):
    if tree is None:
      return None
    def leaf(stored, scale):
      out = dtype
      if jnp.iscomplexobj(stored):
        out = jnp.result_type(dtype, jnp.complex64)
      return load(stored, out, root=root, scales=scale)
    if scale_tree is None:
      return jax.tree.map(lambda x: leaf(x, None), tree)
    return jax.tree.map(leaf, tree, scale_tree)

  return _rule.Moments(
      mu=decode(state.mu, None if scales is None else scales.mu, False),
      nu=decode(state.nu, None if scales is None else scales.nu, True),
      nu_max=decode(nu_max, None if scales is None else scales.nu_max, True))


def step_leaf(g: Array, stored: _rule.Moments, t: Array,
              rule: _rule.AdamRule, index: int = 0,
              scales: Optional[_rule.Moments] = None,
              formats: Optional[_rule.Moments] = None
              ) -> tuple[Array, _rule.Moments, Optional[_rule.Moments]]:
  """Load one leaf's moments, take one Adam step, store them again.

  Args:
    g: the gradient of this leaf.
    stored: its moments in their storage formats.
    t: the step number (int32, from 1).
    rule: the Adam variant.
    index: the leaf's position in the tree; with ``t`` it seeds stochastic
      rounding, so that every leaf and step draws different bits and a run
      is reproducible without keeping a key in the state.
    scales: the block scales of int8 moments (empty arrays for the others),
      or None if no moment is int8.
    formats: the storage formats the moments were created with.

  Returns:
    ``(direction, stored_moments, scales)``: the direction in the gradient's
    dtype, the moments and scales in their storage formats.
  """
  # The rounding seed is traced only where something is rounded: on trees of
  # thousands of float32 leaves its integer ops would cost compile time.
  if g.size and any(x is not None and _is_codes(x) for x in stored):
    seed = _rounding.salt(t, index)
    step = lambda *a: _step_tiled(*a, rule, formats)
    explicit = _explicit_shardings((g, stored, scales))
    if explicit is not None:
      # Slicing a tile out of an array split over Explicit mesh axes would
      # need its sharding spelled out at every slice; inside ``auto_axes``
      # the compiler places the tiles, as on Auto meshes, and the results
      # come back with the inputs' shardings.
      step = jax.sharding.auto_axes(step, out_sharding=explicit)
    return step(g, stored, t, seed, scales)
  dtype = compute_dtype(g.dtype)
  real = real_dtype(dtype)

  def step(g, stored):
    moments = _rule.Moments(
        mu=load(stored.mu, dtype),
        nu=load(stored.nu, real, root=True),
        nu_max=None if stored.nu_max is None else load(stored.nu_max, real,
                                                       root=True))
    return _rule.adam_step(g.astype(dtype), moments, t, rule)

  direction, new = step(g, stored)
  narrow = any(x is not None and jnp.dtype(x.dtype).itemsize < 4
               for x in stored)
  if _fusion.single_pass(g.size) and not rule.cautious and not narrow:
    # The direction again, from the same inputs rather than from ``new``, so
    # that the parameter loop reads what the moment loops read and XLA:CPU
    # merges all three into one pass (see _fusion). A cautious direction
    # needs a mean over the whole array first, so it cannot be merged.
    direction, _ = step(*_fusion.alias((g, stored)))
  bits = (_rounding.random_bits(g.shape, _rounding.salt(t, index)) if narrow
          else None)
  mu_bits, nu_bits, max_bits = _streams(bits)
  return direction.astype(g.dtype), _rule.Moments(
      mu=store(new.mu, stored.mu, mu_bits),
      nu=store(new.nu, stored.nu, nu_bits, root=True),
      nu_max=None if new.nu_max is None else store(
          new.nu_max, stored.nu_max, max_bits, root=True)), scales


def _explicit_shardings(tree: Any) -> Optional[Any]:
  """The shardings of ``tree``'s arrays if any is split over Explicit mesh
  axes (the default of ``jax.make_mesh``), else None."""
  leaves, treedef = jax.tree.flatten(tree)
  shardings = [jax.typeof(x).sharding for x in leaves]
  for sharding in shardings:
    mesh = getattr(sharding, "mesh", None)
    if mesh is not None and not mesh.empty and any(
        t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
      return treedef.unflatten(shardings)
  return None


def _streams(bits: Optional[Array]):
  """Random bits for m, v and max v̂ from one hash per element: m uses the
  top 16 bits, v the bottom 16, and only AMSGrad pays for a second hash."""
  if bits is None:
    return None, None, None
  return bits, bits << 16, _rounding.remix(bits)


# Elements per tile of the quantized path: small enough that a tile's float32
# intermediates stay in cache, large enough that the loop costs little.
TILE_ELEMENTS = 1 << 18


def _step_tiled(g: Array, stored: _rule.Moments, t: Array, seed: Array,
                scales: _rule.Moments, rule: _rule.AdamRule,
                formats: _rule.Moments
                ) -> tuple[Array, _rule.Moments, _rule.Moments]:
  """:func:`step_leaf` for leaves with int8 moments.

  Two passes, each calling the rule on float32 values decoded on the fly:

  * The direction needs only the old moments and the gradient, element by
    element, so it is one elementwise pass over the whole leaf: decode, rule,
    keep the direction. XLA fuses it into a single loop over both cores
    (together with ``optax.apply_updates`` when that follows in the same
    jit), and the decoded moments are never stored.
  * The new codes need each block's maximum before any element can be
    encoded, which one elementwise pass cannot provide. A loop over tiles of
    whole blocks decodes one tile of each moment, applies the rule again,
    takes the tile's block maxima and encodes it, writing codes and scales
    back in place; a moment is thus never held in float32 beyond one tile
    (``TILE_ELEMENTS``). The tail that does not fill a tile is one more,
    smaller, tile.

  The two passes run the same rule on the same decoded values, so the
  direction agrees with the moments stored (up to the compiler's choice of
  fused multiply-adds). Cautious masking normalises over the whole array and
  reads no moment, so only the direction pass applies it.
  """
  dtype = compute_dtype(g.dtype)
  real = real_dtype(dtype)
  n = g.size
  names = [name for name in _rule.Moments._fields
           if getattr(stored, name) is not None]
  # Static per moment: block size (None for floats), stochastic rounding,
  # √v storage, compute dtype.
  static = {}
  for name in names:
    x, s = getattr(stored, name), getattr(scales, name)
    block = _quant.block_size_of(n, s.shape[0]) if _is_codes(x) else None
    spec = getattr(formats, name) if formats is not None else None
    stochastic = (spec.stochastic if isinstance(spec, _quant.BlockwiseInt8)
                  else True)
    static[name] = (block, stochastic, name != "mu",
                    dtype if name == "mu" else real)
  unit = math.lcm(*[b for b, *_ in static.values() if b is not None])
  tile = unit * max(1, TILE_ELEMENTS // unit)
  n_loop, rest = divmod(n, tile)
  flat_g = g.reshape(-1)

  whole = {name: _read(getattr(stored, name), getattr(scales, name), 0, n,
                       *static[name]) for name in names}
  direction, _ = _rule.adam_step(flat_g.astype(dtype),
                                 _rule.Moments(**whole), t, rule)
  tile_rule = rule._replace(cautious=False)

  def tile_step(start, length, carry):
    # Each tile is read from the codes and written back to the same place
    # before the next tile is read: the loop updates the state in place.
    # (Computing the direction here too would need a float32 direction of
    # the whole leaf in the carry and a second pass to apply it: slower.)
    values, scale_values = (dict(x) for x in carry)
    g_tile = jax.lax.dynamic_slice(flat_g, (start,), (length,)).astype(dtype)
    loaded = {name: _read(values[name], scale_values[name], start, length,
                          *static[name]) for name in names}
    _, new = _rule.adam_step(g_tile, _rule.Moments(**loaded), t, tile_rule)
    padded = -(-length // unit) * unit
    bits = _rounding.random_bits((padded,), seed, offset=start)
    streams = dict(zip(_rule.Moments._fields, _streams(bits)))
    for name in names:
      values[name], scale_values[name] = _write(
          values[name], scale_values[name], getattr(new, name), start,
          streams[name], *static[name][:3])
    return values, scale_values

  carry = ({name: getattr(stored, name) for name in names},
           {name: getattr(scales, name) for name in names})
  if n_loop:
    carry = jax.lax.fori_loop(
        0, n_loop, lambda i, c: tile_step(i * tile, tile, c), carry)
  if rest:
    carry = tile_step(n_loop * tile, rest, carry)
  values, scale_values = carry
  new_stored = _rule.Moments(**{name: values.get(name)
                                for name in _rule.Moments._fields})
  new_scales = scales._replace(**scale_values)
  return direction.reshape(g.shape).astype(g.dtype), new_stored, new_scales


def _read(stored: Array, scales: Array, start: Any, length: int,
          block: Optional[int], stochastic: bool, root: bool,
          dtype: Any) -> Array:
  """Elements ``[start, start + length)`` of a stored moment, flat."""
  del stochastic
  flat = jax.lax.dynamic_slice(stored.reshape(-1), (start,), (length,))
  tile_scales = None
  if block is not None:
    n_blocks = -(-length // block)
    tile_scales = jax.lax.dynamic_slice(scales, (start // block,), (n_blocks,))
  if block is None:
    value = flat.astype(dtype)
    return value * value if _is_root(stored, root) else value
  values = _quant.dequantize_blocks(_quant.to_blocks(flat, block),
                                    tile_scales)
  return values.reshape(-1)[:length].astype(dtype)


def _write(stored: Array, scales: Array, value: Array, start: Any,
           bits: Array, block: Optional[int], stochastic: bool,
           root: bool) -> tuple[Array, Array]:
  """``stored`` (and ``scales``) with elements ``[start, start + n)`` set to
  the flat compute-dtype ``value``, rounded into the storage format."""
  length = value.shape[0]
  if block is None:
    value = store(value, stored, bits[:length], root=root)
  else:
    n_blocks = -(-length // block)
    tiles = _quant.to_blocks(value.astype(jnp.float32), block)
    tile_bits = _quant.to_blocks(bits, block)[:n_blocks] if stochastic else None
    codes, tile_scales = _quant.quantize_blocks(tiles, stored.dtype == jnp.int8,
                                                tile_bits)
    value = codes.reshape(-1)[:length]
    scales = jax.lax.dynamic_update_slice(scales, tile_scales,
                                          (start // block,))
  flat = jax.lax.dynamic_update_slice(stored.reshape(-1), value, (start,))
  return flat.reshape(stored.shape), scales

"""How a moment is kept between steps, separate from how it is computed.

The Adam rule (:mod:`jadam._rule`) always runs in float32 or wider. A moment's
*storage* format is chosen per moment (``mu_dtype``, ``nu_dtype``) and this
module converts between the two around each call of the rule, so that formats
never touch the arithmetic.

Formats:

* float32 / float64: the moment as is.
* bfloat16 / float16: rounded *stochastically* when stored (unbiased, see
  :mod:`jadam._rounding`), seeded by the step count and the element's index,
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

from jadam import _boxes
from jadam import _compat
from jadam._compat import NamedSharding, PartitionSpec

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


def zeros(like: Array, shape: tuple[int, ...], dtype: Any, *,
          block: Optional[int] = None) -> Array:
  """Zeros of ``shape`` and ``dtype`` for optimizer state derived from ``like``
  (``block``: elements per scale, for block scales).

  Every zero-initialised piece of state is made here, so that where state is
  placed (for example on the parameter's sharding) is decided in one place.
  """
  # Placement on a device mesh is the sharding module's concern; imported
  # here because this function's body is the only hook it owns in this file.
  from jadam import _sharding  # pylint: disable=g-import-not-at-top
  return _sharding.zeros_placed_like(like, shape, dtype, block=block)


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


def _as_array(param: Any) -> Any:
  """A Python or NumPy scalar leaf as an array (optax accepts them too)."""
  return param if hasattr(param, "dtype") else jnp.asarray(param)


def _inexact(param: Any) -> bool:
  return jnp.issubdtype(param.dtype, jnp.inexact)


def quantized(param: Any, storage: Storage, *, real: bool) -> bool:
  """Whether this moment of ``param`` is stored as int8 block codes."""
  param = _as_array(param)
  if not isinstance(storage, _quant.BlockwiseInt8) or not _inexact(param):
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
  param = _as_array(param)
  if not _inexact(param):
    # Integer and boolean leaves (step counters, frozen buffers) get zeros of
    # their own dtype, as optax gives them; a gradient for them is an error
    # at update, naming the key path.
    return zeros(param, param.shape, param.dtype)
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
  if (jnp.issubdtype(dtype, jnp.complexfloating)
      and not jnp.issubdtype(compute, jnp.complexfloating)):
    dtype = real_dtype(dtype)  # complex storage of a real moment
  if jnp.issubdtype(compute, jnp.complexfloating):
    dtype = (jnp.result_type(dtype, jnp.complex64) if dtype.itemsize >= 4
             else compute)
  return zeros(param, param.shape, dtype)


def init_scales(param: Array, storage: Storage, *, real: bool
                ) -> Optional[Array]:
  """The float32 block scales of an int8 moment, or None for a moment that
  is not int8 (an empty entry: no placeholder array in the state)."""
  param = _as_array(param)
  if not quantized(param, storage, real=real):
    return None
  shape = tuple(param.shape)
  return zeros(param, (storage.n_blocks_for(shape),), jnp.float32,
               block=storage.block_for(shape))


def _is_codes(stored: Array) -> bool:
  return jnp.dtype(stored.dtype) in (jnp.int8, jnp.uint8)


def _is_root(stored: Array, root: bool) -> bool:
  # float16 cannot hold v = g² (it underflows below |g| ≈ 2.4e-4 and
  # overflows above |g| = 256); √v has the range of g itself. int8 codes
  # (uint8 for second moments) hold √v too: a block's code map spans 7
  # decades below its scale, which is 14 decades of v when the codes hold
  # √v but only 7 when they hold v, so gradients spread over more than
  # 3.5 decades inside a block (an outlier, a wide dynamic range) no longer
  # flush their smaller block-mates to the bottom of the map.
  return root and jnp.dtype(stored.dtype) in (jnp.float16, jnp.uint8)


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
    # Decoded in the shape the step uses (:func:`_block_view`), so that a
    # parameter split over two mesh axes is decoded where it lies (decoded
    # flat, its codes and scales disagreed on an Explicit mesh).
    block = _quant.block_size_of(stored.size, scales.shape[0])
    view = _block_view(tuple(stored.shape), {block})

    def decode(stored, scales):
      return _read(stored, scales, view, block, False, root,
                   dtype).reshape(stored.shape)
    explicit = _explicit_shardings(stored)
    if explicit is not None:
      # As in :func:`step_leaf`: on Explicit mesh axes the blocks are cut
      # inside ``auto_axes``, and the values come back split like the codes.
      decode = _compat.auto_axes(decode, out_sharding=explicit)
    return decode(stored, scales)
  value = stored.astype(dtype)
  return value * value if _is_root(stored, root) else value


def store(value: Array, like: Array, bits: Optional[Array], *,
          root: bool = False) -> Array:
  """A float moment computed in the compute dtype, put back in ``like``'s
  format (codes are stored with their block scales, see :func:`_write`).

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


def _scales_of(state: Any, field: str) -> Any:
  """The block scales of ``state``'s moment ``field``, or None.

  The Adam family keeps them as ``Moments(mu, nu, nu_max)``, AdEMAMix as a
  dict by field name, Adam without momentum (schedule-free AdamW's base) as
  the tree of ``nu``'s alone.
  """
  scales = getattr(state, "scales", None)
  if scales is None:
    return None
  if isinstance(scales, _rule.Moments):
    return getattr(scales, field, None)
  if isinstance(scales, dict) and set(scales) <= {"m1", "m2", "nu"}:
    return scales.get(field)
  return scales if field == "nu" else None


def decode_moments(state: Any, dtype: Any = jnp.float32) -> _rule.Moments:
  """The moments of a jadam optimizer's state, as arrays whatever their
  storage.

  int8 codes are decoded with their block scales, float16 second moments
  squared back from √v, and everything cast to ``dtype`` (complex moments
  stay complex). Use it to log or inspect moments.

  Args:
    state: the state of any of jadam's ``scale_by_*`` transformations
      (``ScaleByAdamState``, ``ScaleByAmsgradState``, AdEMAMix's, and the
      second-moment state of schedule-free AdamW and ADOPT's base), found
      inside a chain's state first (for example ``state[0]`` of
      ``jadam.adam``'s).
    dtype: float dtype of the result.

  Returns:
    ``Moments(mu, nu, nu_max)`` of trees with the parameters' structure:
    ``mu`` is the first moment (AdEMAMix's fast EMA ``m1``; None for a state
    without one), ``nu`` the second moment v, ``nu_max`` AMSGrad's running
    maximum (None otherwise).

  Example:
    >>> import jax.numpy as jnp, jadam
    >>> state = jadam.scale_by_adam(nu_dtype="int8").init({"w": jnp.ones(8192)})
    >>> state.nu["w"].dtype, jadam.decode_moments(state).nu["w"].dtype
    (dtype('uint8'), dtype('float32'))
  """
  def decode(field, root):
    tree = getattr(state, field, None)
    if tree is None:
      return None
    scale_tree = _scales_of(state, field)

    def leaf(stored, scale):
      out = dtype
      if jnp.iscomplexobj(stored):
        out = jnp.result_type(dtype, jnp.complex64)
      return load(stored, out, root=root, scales=scale)
    # Entry by entry: Flax boxes of the scales carry axis names of their
    # own, so the two trees need not have one structure.
    plain = _boxes.strip(tree)
    if scale_tree is None:
      return _boxes.restore(tree, jax.tree.map(lambda x: leaf(x, None), plain))
    return _boxes.restore(tree, jax.tree.map(leaf, plain,
                                             _boxes.strip(scale_tree)))

  first = "m1" if hasattr(state, "m1") else "mu"
  return _rule.Moments(mu=decode(first, False), nu=decode("nu", True),
                       nu_max=decode("nu_max", True))


@jax.custom_jvp
def _not_differentiable(tree: Any) -> Any:
  """``tree`` itself; differentiating through it raises a ``TypeError``.

  Guards the int8 codec's inputs: its codes are integers, so ``jax.grad``
  through them would be zero and a derivative through an int8 moment would
  be silently wrong (only the block scales carry one).
  """
  return tree


@_not_differentiable.defjvp
def _not_differentiable_jvp(primals, tangents):
  del primals, tangents
  raise TypeError(
      "jadam: this optimizer stores a moment as int8 codes, which are "
      "integers, so differentiating through its update (jax.grad or jax.jvp "
      "of a loss after optimizer steps, as in meta-learning) would give a "
      "wrong derivative. Store the moments as float32, bfloat16 or float16 "
      "(their rounding is differentiated as the identity), or accept the "
      "approximate derivative through the block scales with "
      "mu_dtype/nu_dtype=jadam.storage.BlockwiseInt8("
      "approximate_derivative=True) (its measured error is in "
      "docs/reliability.md).")


def step_leaf(g: Array, stored: tuple, t: Array, leaf: _rule.LeafRule,
              stream: Any = 0, scales: Optional[tuple] = None,
              formats: Optional[tuple] = None
              ) -> tuple[Array, tuple, Optional[tuple]]:
  """Load one leaf's moments, take one step of ``leaf``, store them again.

  This is the one codec of the package: every optimizer reaches its moments
  through here, whatever its recurrence.

  Args:
    g: the gradient of this leaf.
    stored: its moments in their storage formats, in ``leaf``'s order.
    t: the step number (int32, from 1).
    leaf: the optimizer's step on one array (:class:`jadam._rule.LeafRule`).
    stream: the leaf's position in its tree (an int, or a traced uint32
      scalar so that leaves of one shape share their compiled code).
      Stochastic rounding draws element ``i`` of a leaf from position ``i``
      of a stream seeded by the step ``t`` and ``stream``: a run is
      reproducible without a key in the state, and leaves of equal shape
      round independently. Inside ``jax.shard_map`` a shard split over
      manual axes draws from position ``shard·n + i`` (``n`` its size,
      ``shard`` its index over those axes, :func:`_shard_offset`): the
      shards' bits are disjoint, and for a leaf split along its leading
      axis they are the bits of the whole-array run.
    scales: the block scales of int8 moments (None for the others, or a
      scalar placeholder in states made by earlier releases), or None if no
      moment is int8.
    formats: the storage formats the moments were created with.

  Returns:
    ``(direction, stored_moments, scales)``: the direction in the gradient's
    dtype, the moments and scales in their storage formats.
  """
  stored = tuple(stored)
  # The rounding seed is traced only where something is rounded: on trees of
  # thousands of float32 leaves its integer ops would cost compile time.
  if g.size and any(_is_codes(x) for x in stored):
    seed = _leaf_seed(t, stream)
    offset = _shard_offset(g)
    # The rule's per-call values travel as arguments: a value traced outside
    # ``auto_axes`` (below) is not valid inside it. Python numbers stay
    # static, so that they round as in the plain path.
    arrays, rebuild = _rule.split_scalars(leaf)
    if formats is None or not all(
        f.approximate_derivative for f in formats
        if isinstance(f, _quant.BlockwiseInt8)):
      g, stored, scales, arrays = _not_differentiable(
          (g, stored, scales, arrays))

    def step(g, stored, t, seed, scales, arrays):
      return _step_quantized(g, stored, t, seed, offset, scales,
                             rebuild(arrays), formats)

    explicit = _explicit_shardings((g, stored, scales))
    if explicit is not None:
      # Cutting an array split over Explicit mesh axes into blocks would
      # need its sharding spelled out at every reshape; inside ``auto_axes``
      # the compiler places the blocks, as on Auto meshes, and the results
      # come back with the inputs' shardings.
      step = _compat.auto_axes(step, out_sharding=explicit)
    return step(g, stored, t, seed, scales, arrays)
  dtype = compute_dtype(g.dtype)
  dtypes = [real_dtype(dtype) if real else dtype for real in leaf.real]

  def step(g, stored):
    moments = tuple(load(x, d, root=real)
                    for x, d, real in zip(stored, dtypes, leaf.real))
    direction, new = leaf.step(g.astype(dtype), moments, leaf.scalars)
    if leaf.cautious:
      direction = _rule.caution(direction, g.astype(dtype))
    return direction, new

  direction, new = step(g, stored)
  narrow = any(jnp.dtype(x.dtype).itemsize < 4 for x in stored)
  seed = _leaf_seed(t, stream) if narrow else None
  offset = _shard_offset(g) if narrow else 0
  streams = _streams(None if seed is None
                     else _bits(g.shape, seed, offset))
  if _fusion.single_pass(g.size) and not leaf.cautious:
    # The direction again, from the same inputs rather than from ``new``, so
    # that the parameter loop reads what the moment loops read and XLA:CPU
    # merges them into one pass (see _fusion). A cautious direction needs a
    # mean over the whole array first, so it cannot be merged.
    direction, _ = step(*_fusion.alias((g, stored)))
    if narrow:
      # Each rounded moment from inputs of its own (see _own_inputs).
      parts = []
      for k in range(len(stored)):
        (g_k, stored_k), streams_k = _own_inputs((g, stored), g.shape, seed,
                                                 offset, k + 1)
        parts.append((step(g_k, stored_k)[1][k], streams_k[k]))
      new = tuple(p[0] for p in parts)
      streams = [p[1] for p in parts]
  return direction.astype(g.dtype), tuple(
      store(value, x, bits, root=real) for value, x, bits, real in zip(
          new, stored, streams, leaf.real)), scales


def _explicit_shardings(tree: Any) -> Optional[Any]:
  """The shardings of ``tree``'s arrays if any is split over Explicit mesh
  axes (the default of ``jax.make_mesh``), else None."""
  leaves, treedef = jax.tree.flatten(tree)
  shardings = [_compat.typeof(x).sharding for x in leaves]
  for sharding in shardings:
    mesh = getattr(sharding, "mesh", None)
    if mesh is not None and not mesh.empty and any(
        _compat.is_explicit(t) for t in mesh.axis_types):
      # An array on no mesh (a gradient made outside it, say) meets the
      # mesh's arrays as a replicated one, as it does in any jnp operation.
      return treedef.unflatten([
          NamedSharding(mesh, PartitionSpec())
          if getattr(s, "mesh", None) is None or s.mesh.empty else s
          for s in shardings])
  return None


def _step_quantized(g: Array, stored: tuple, t: Array, seed: tuple,
                    offset: Any, scales: tuple, leaf: _rule.LeafRule,
                    formats: Optional[tuple]
                    ) -> tuple[Array, tuple, tuple]:
  """:func:`step_leaf` for leaves with int8 moments, without a tile loop.

  Encoding a new moment needs its block's scale before any element of the
  block is encoded. The exact maximum of the new moment would need a pass of
  its own over the decoded moments, which XLA:CPU can only run fast as a
  sequential loop over tiles (it cannot fuse the decoding into a fast
  reduction): that loop alone cost about twice the float32 step, on one
  core. So where the rule's recurrence gives one (``leaf.bounds``, for
  example :func:`jadam._rule.scale_bounds`), the new scale is an *upper
  bound* of the new block's largest finite |value|, from the block's old
  scale and its largest finite |g|: one reduction of the plain float32
  gradient, which XLA:CPU does fast. Everything else is elementwise over the
  whole leaf (decode with the old scales, the rule, encode with the new
  scales), so XLA runs it as loops over both cores: one for the direction
  and one for each moment's codes, each decoding the moments it needs on the
  fly, so that no moment is ever held in float32. A moment the rule gives no
  bound for is scaled by the exact maxima of its new values instead.

  A bound above the block's true maximum costs little precision: the
  octaves of each of the code map's runs hold the same number of points, so
  it moves the block's values a few octaves down the map, towards its
  bottom, without coarsening them while they stay in the dense top run
  (measured in docs/memory.md).

  A skipped step (``leaf.held``) keeps the old scales. A block whose bound
  is zero gets the smallest normal float32 instead: a positive scale that
  decodes its zero codes to zero. Scales are clipped to
  :data:`jadam._quant.MAX_SCALE` (2^126, whose reciprocal is still a normal
  float32); rounding can put a value a few ulps above its bound, and
  encoding clips it to the top code.

  The direction and the moments come from the same rule on the same decoded
  values (up to the compiler's choice of fused multiply-adds).
  """
  dtype = compute_dtype(g.dtype)
  real = real_dtype(dtype)
  n = g.size
  # Static per moment: block size (None for floats), stochastic rounding,
  # √v storage, compute dtype.
  static = []
  for k, (x, s) in enumerate(zip(stored, scales)):
    block = _quant.block_size_of(n, s.shape[0]) if _is_codes(x) else None
    spec = formats[k] if formats is not None else None
    stochastic = (spec.stochastic if isinstance(spec, _quant.BlockwiseInt8)
                  else True)
    static.append((block, stochastic, leaf.real[k],
                   real if leaf.real[k] else dtype))
  view = _block_view(g.shape, {spec[0] for spec in static} - {None})
  flat_g = g.reshape(view).astype(dtype)

  def run_rule(flat_g, stored, scales):
    loaded = tuple(_read(x, s, view, *spec)
                   for x, s, spec in zip(stored, scales, static))
    return leaf.step(flat_g, loaded, leaf.scalars)

  direction, _ = run_rule(flat_g, stored, scales)
  if leaf.cautious:
    direction = _rule.caution(direction, flat_g)
  bounds = _scale_bounds(flat_g, scales, static, leaf)
  values, new_scales = [], []
  for k, (x, old) in enumerate(zip(stored, scales)):
    # Each moment's codes from inputs of its own (see _own_inputs).
    inputs, streams = _own_inputs((flat_g, stored, scales, bounds), view,
                                  seed, offset, k)
    value = run_rule(*inputs[:3])[1][k]
    block, scale, new_scale = static[k][0], inputs[3][k], bounds[k]
    if block is None:
      new_scale = old  # a float moment keeps its empty entry
    elif new_scale is None:
      top = jnp.sqrt(value) if _is_root(x, static[k][2]) else value
      new_scale = scale = _rule.hold(leaf.held, _exact_scales(top, block),
                                     old)
    monotone = k < len(leaf.monotone) and leaf.monotone[k]
    values.append(_write(x, value, scale, streams[k], *static[k][:3],
                         round_up=monotone))
    new_scales.append(new_scale)
  return (direction.reshape(g.shape).astype(g.dtype), tuple(values),
          tuple(new_scales))


def _leaf_seed(t: Array, stream: Any) -> tuple[Array, Array]:
  """The rounding seed of a leaf's step, as ``(shared, shift)``: the bits
  are the step's one stream (seeded by ``t``, the same for every leaf) plus
  a per-leaf ``shift`` hashed from ``t`` and the leaf's position ``stream``
  (see :func:`_bits`). A Weyl sequence plus a constant is the same sequence
  from another start, so this is a seed per leaf; kept apart, the shared
  part is computed once for all leaves of one shape: hashing the position
  into each leaf's seed made compiling 400 leaves of five shapes with
  bfloat16 moments take 20 s instead of 4.6 s on CPU."""
  return _rounding.salt(t), _rounding.salt(t, stream)


def _bits(shape: tuple[int, ...], seed: tuple[Array, Array],
          offset: Any) -> Array:
  """The random bits of a leaf (see :func:`_leaf_seed`)."""
  shared, shift = seed
  return _rounding.random_bits(shape, shared, offset) + shift


def _shard_offset(g: Array) -> Any:
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
  return shard.astype(jnp.uint32) * _rounding.uint32(g.size)


def _own_inputs(tree: Any, shape: tuple[int, ...], seed: tuple, offset: Any,
                tag: int) -> tuple[Any, list[Array]]:
  """``tree`` made opaque with :func:`jadam._fusion.separate` under ``tag``,
  and the random-bit streams of ``shape`` drawn behind its offset of zero
  (the same bits as an ordinary draw at ``offset``), so that a loop computing one stored
  moment from them shares nothing with the other loops (see there)."""
  tree, zero = _fusion.separate(tree, tag)
  if not isinstance(zero, int):
    offset = zero + (_rounding.uint32(offset) if isinstance(offset, int)
                     else offset)
  bits = _bits(shape, seed, offset)
  return tree, list(_streams(bits))


def _blocks(flat: Array, block: int) -> list[Array]:
  """``flat`` as (blocks, block) arrays: the whole blocks, then the shorter
  last block if any, so that nothing is padded (a copy)."""
  n = flat.shape[0]
  whole = n - n % block
  parts = [flat[:whole].reshape(-1, block)] if whole else []
  if whole < n:
    parts.append(flat[whole:].reshape(1, -1))
  return parts


def _concat(parts: list[Array]) -> Array:
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


# Gradients larger than this (whose square would exceed MAX_SCALE, 2^126)
# are left out of the block maxima behind the int8 scale bounds: such an
# element's v is +inf (a code of its own, a zero step, as with float32
# moments), and the scale stays that of its block-mates.
LARGEST_G = 2.0**63


def _block_max_abs(flat: Array, block: int) -> Array:
  """The largest |x| <= ``LARGEST_G`` of each block of ``block`` elements of
  ``flat`` (non-finite and overflowing values left out).

  XLA:CPU reduces a plain float32 array fast (YNNPACK), but first writes out
  any elementwise function of it, a float32 copy of the whole gradient. So
  the maxima are taken as max(x) and -min(x) of the gradient itself, and
  only if some block holds a non-finite value are they recomputed with the
  non-finite values left out, a tile at a time (under ``lax.cond``, which a
  healthy step does not pay for). Complex values are reduced by modulus
  (the max and min of a complex array would order by real part).
  """
  if jnp.iscomplexobj(flat):
    flat = jnp.abs(flat)

  def finite_max(part):
    magnitude = jnp.abs(part)
    part = jnp.where(magnitude <= LARGEST_G, magnitude, 0)  # NaN: False
    return jnp.max(part, axis=-1).astype(jnp.float32)

  if flat.ndim > 1 and flat.size <= FALLBACK_TILE:
    # A block view (see _block_view): blocks are the last axis, and the
    # other axes keep the parameter's sharding.
    return finite_max(flat).reshape(-1)
  view = flat
  flat = flat.reshape(-1)
  parts = _blocks(flat, block)

  def tiled_finite_max(part):
    rows = max(1, FALLBACK_TILE // part.shape[1])
    n_loop = part.shape[0] // rows
    if n_loop <= 1:
      return finite_max(part)
    out = jnp.zeros(part.shape[:1], jnp.float32)
    def body(i, out):
      tile = jax.lax.dynamic_slice_in_dim(part, i * rows, rows)
      return jax.lax.dynamic_update_slice_in_dim(out, finite_max(tile),
                                                 i * rows, 0)
    out = jax.lax.fori_loop(0, n_loop, body, out)
    if n_loop * rows < part.shape[0]:
      out = out.at[n_loop * rows:].set(finite_max(part[n_loop * rows:]))
    return out

  if flat.shape[0] <= FALLBACK_TILE:
    # A small leaf is in cache: the elementwise |x| costs nothing, and no
    # branch is needed (a branch per leaf costs compile time, and under
    # vmap, see _transform.walk, it would run both sides).
    return _concat([finite_max(p) for p in parts])
  if view.ndim > 1:
    # The healthy path on the block view, so that the reduction keeps the
    # parameter's sharding; the rare fallback below works on the flat leaf.
    fast = jnp.maximum(jnp.max(view, axis=-1),
                       -jnp.min(view, axis=-1)).astype(jnp.float32).reshape(-1)
  else:
    fast = _concat([jnp.maximum(jnp.max(p, axis=1), -jnp.min(p, axis=1))
                    .astype(jnp.float32) for p in parts])
  return jax.lax.cond(jnp.all(fast <= LARGEST_G), lambda: fast,
                      lambda: _concat([tiled_finite_max(p) for p in parts]))


# Elements per tile of the block maxima of a gradient with non-finite values.
FALLBACK_TILE = 1 << 18


def _scale_bounds(flat_g: Array, scales: tuple, static: list,
                  leaf: _rule.LeafRule) -> tuple:
  """The new block scales of the int8 moments for which ``leaf.bounds``
  gives an upper bound (None for the others): the rule's bounds from each
  block's largest finite |g| (G) and its old scales, clipped to
  [smallest normal float32, :data:`jadam._quant.MAX_SCALE`], and the old
  scales where a step is skipped.

  G leaves out gradients above ``LARGEST_G`` (2^63, whose square would
  exceed 2^126): their v is +inf, stored as its own code, so they do not
  inflate their block's scale.
  """
  blocks = [spec[0] for spec in static]
  if leaf.bounds is None or all(block is None for block in blocks):
    return tuple(None for _ in blocks)
  smallest = min(block for block in blocks if block is not None)
  g_max = {smallest: _block_max_abs(flat_g, smallest)}
  for block in set(blocks) - {smallest, None}:
    g_max[block] = jnp.max(_quant.to_blocks(g_max[smallest],
                                            block // smallest), axis=1)
  # The codes of second moments hold √v and their scales bound √v: the
  # rule's recurrences see and give v-domain bounds.
  roots = [block is not None and spec[2] for block, spec in zip(blocks,
                                                                 static)]
  raw = leaf.bounds(
      tuple(None if block is None else g_max[block] for block in blocks),
      tuple(s * s if root else s for s, root in zip(scales, roots)),
      leaf.scalars)
  out = []
  for bound, block, old, root in zip(raw, blocks, scales, roots):
    if bound is None or block is None:
      out.append(None)
      continue
    bound = bound.astype(jnp.float32)
    if root:
      bound = jnp.sqrt(bound)
    bound = jnp.clip(bound, jnp.finfo(jnp.float32).tiny, _quant.MAX_SCALE)
    out.append(_rule.hold(leaf.held, bound, old))
  return tuple(out)


def _exact_scales(value: Array, block: int) -> Array:
  """Block scales from the exact largest finite |value| of each block (for a
  moment whose recurrence gives no bound), clipped as bounds are."""
  magnitude = jnp.abs(value).astype(jnp.float32)
  magnitude = jnp.where(jnp.isfinite(magnitude), magnitude, 0)
  if magnitude.ndim > 1:  # a block view: blocks are the last axis
    top = jnp.max(magnitude, axis=-1).reshape(-1)
  else:
    top = _concat([jnp.max(part, axis=1)
                   for part in _blocks(magnitude, block)])
  return jnp.clip(top, jnp.finfo(jnp.float32).tiny, _quant.MAX_SCALE)



def _streams(bits: Optional[Array]):
  """Random bits for a leaf's first, second and third moments (m, v and
  max v̂ for the Adam family) from one draw per element: the first uses the
  top 16 bits, the second the bottom 16, and only a third moment pays for a
  hash of them."""
  if bits is None:
    return None, None, None
  return bits, bits << 16, _rounding.remix(bits)


def _block_view(shape: tuple[int, ...], blocks: set) -> tuple[int, ...]:
  """The shape an int8 leaf is stepped in: ``shape[:-1] + (k, block)`` when
  its last axis is whole blocks (of the one block size of its int8
  moments), so that every axis the parameter is split over on a device mesh
  survives (cut into one flat axis, a parameter split over two mesh axes
  came back split over one: its codes doubled per device and the step
  compiled twice); the flat ``(n,)`` otherwise. Either way blocks are runs
  of ``block`` consecutive elements in row-major order."""
  n = math.prod(shape)
  if len(shape) >= 2 and len(blocks) == 1:
    (block,) = blocks
    if shape[-1] % block == 0:
      return tuple(shape[:-1]) + (shape[-1] // block, block)
  return (n,)


def _per_element(scales: Array, block: int, view: tuple[int, ...]) -> Array:
  """Each element's block scale, for a leaf of shape ``view`` (see
  :func:`_block_view`), as a broadcast the compiler fuses into the
  elementwise loop that reads it (nothing is stored)."""
  if len(view) > 1:
    return jax.lax.broadcast_in_dim(scales.reshape(view[:-1]), view,
                                    tuple(range(len(view) - 1)))
  n_blocks = scales.shape[0]
  spread = jax.lax.broadcast_in_dim(scales, (n_blocks, block), (0,))
  return spread.reshape(-1)[:view[0]]


def _read(stored: Array, scales: Array, view: tuple[int, ...],
          block: Optional[int], stochastic: bool, root: bool,
          dtype: Any) -> Array:
  """A stored moment, of shape ``view``, in the compute ``dtype``."""
  del stochastic
  flat = stored.reshape(view)
  if block is None:
    value = flat.astype(dtype)
    return value * value if _is_root(stored, root) else value
  values = _quant.decode(flat) * _per_element(scales, block, view)
  if _is_root(stored, root):
    values = values * values  # the codes hold √v
  return values.astype(dtype)


def _write(stored: Array, value: Array, scales: Optional[Array],
           bits: Array, block: Optional[int], stochastic: bool,
           root: bool, round_up: bool = False) -> Array:
  """The flat compute-dtype ``value`` rounded into ``stored``'s format, with
  the new block ``scales`` for codes (rounded up with ``round_up``: AMSGrad's
  running maximum must not decrease through rounding)."""
  if block is None:
    return store(value, stored, bits, root=root).reshape(stored.shape)
  if _is_root(stored, root):
    value = jnp.sqrt(value)  # the codes hold √v, scales bound √v
  # A multiply by each block's reciprocal scale rather than a division:
  # XLA:CPU does not fuse a division into a consumer that uses its result
  # several times (as encoding does), and would store y in float32.
  y = value.astype(jnp.float32) * _per_element(1 / scales, block,
                                               value.shape)
  signed = stored.dtype == jnp.int8
  codes = _quant.encode(y, signed, bits if stochastic else None,
                        round_up=round_up,
                        positive=None if signed else value > 0)
  return codes.reshape(stored.shape)

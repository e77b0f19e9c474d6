"""Block-wise int8 storage of a moment (Dettmers et al., ICLR 2022).

A quantized moment is one :class:`Int8Moment` leaf in the optimizer state:
int8 codes (first moments) or uint8 codes holding √v (second moments) of the
parameter's shape, and one float32 scale per block of ``block`` consecutive
elements. The code maps are in :mod:`jadam._formats._codes`; this module
chooses the blocks, places the scales and runs the step of a leaf with int8
moments (:func:`step`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jadam import _boxes
from jadam import _compat
from jadam import _fusion
from jadam import _rounding
from jadam import _rule
from jadam.sharding import _placement
from jadam._formats import _codes
from jadam._formats import floats

Array = jax.Array


class Int8Moment(NamedTuple):
  """A moment stored as block-wise int8 codes: one leaf of an optimizer
  state where a float moment would be one array.

  A NamedTuple, so that ``jax``, orbax, ``flax.serialization`` and pickle
  round-trip it with its type. Code that maps a function over a state's
  moments together with the parameters treats it as one leaf:
  ``jax.tree.map(f, params, state.mu, is_leaf=lambda x: isinstance(x,
  jadam.Int8Moment))``.

  Attributes:
    codes: int8 (a first moment) or uint8 (a second moment, holding √v),
      of the parameter's shape; in the parameter's Flax box, if any.
    scales: float32, ``(n_blocks,)``: each block's scale (an upper bound
      of its largest finite |value|); split like the parameter's leading
      axis where no block spans two of its rows, else replicated
      (:func:`jadam.sharding.scales_follow_rows`).
  """

  codes: Any
  scales: Any


@dataclasses.dataclass(frozen=True)
class BlockwiseInt8:
  """The ``"int8"`` storage format, with its knobs.

  Pass an instance as ``mu_dtype`` / ``nu_dtype`` of any jadam optimizer;
  the string ``"int8"`` means ``BlockwiseInt8()``.

  A quantized moment is one :class:`Int8Moment` leaf in the optimizer
  state: codes of the parameter's shape and float32 block scales of shape
  ``(n_blocks,)``. Blocks are runs of
  ``block_size`` consecutive elements of the flattened parameter, the last
  one possibly shorter. A block never spans two rows of a parameter whose
  rows (its last axis) are shorter than ``block_size``, with ``row_blocks``:
  each row then gets blocks of the largest power of two dividing its length
  (at least 32 elements).

  Rows of an embedding table are seen at very different rates (token
  frequencies are Zipf-distributed), and a block shared by a frequent and a
  rare row takes its scale from the frequent one, pushing the rare row's
  moments down the code map: on the Zipf embedding test (512 rows of 32,
  600 steps) the rare rows end 0.055 from the float32-moment run with
  blocks of 256, 0.042 with a block per row, against 0.046 for blocks of
  256 scaled by their exact maxima (docs/memory.md).

  Attributes:
    block_size: elements per block sharing one float32 scale, a power of two
      (Dettmers et al. use 2048 in their CUDA kernels and study 256 and
      smaller; smaller blocks isolate outliers better and cost
      4/block_size extra bytes per element).
    min_size: parameters with fewer elements keep this moment in float32.
    stochastic: round to a random neighbouring code, unbiased (the default),
      or to the nearest one (as the paper).
    approximate_derivative: let ``jax.grad``/``jax.jvp`` differentiate
      through these moments (meta-gradients through training). The codes
      are integers, so the derivative flows only through the block scales
      and the float parts of the step: an approximation whose measured error
      is in docs/reliability.md. False (the default) makes differentiating
      through them a ``TypeError`` rather than a silently wrong number.
    row_blocks: blocks never span two rows shorter than ``block_size``
      (the default; costs 4 bytes of scale per block: 1/8 byte per element
      for rows of 32). False cuts such rows into blocks of ``block_size``.

  Example:
    >>> import jadam
    >>> opt = jadam.adam(1e-3, mu_dtype=jadam.BlockwiseInt8(block_size=128),
    ...                  nu_dtype="int8")
  """

  block_size: int = 256
  min_size: int = 4096
  stochastic: bool = True
  row_blocks: bool = True
  approximate_derivative: bool = False

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

  def for_leaf(self, shape: tuple[int, ...], dtype: Any, *,
               second: bool) -> Any:
    """What this format stores for a parameter of ``shape`` and ``dtype``:
    an :class:`Int8Leaf`, or (for leaves below ``min_size``, integer
    parameters and complex first moments, which have no 8-bit code) the
    compute dtype as a :class:`jadam._formats.floats.FloatLeaf`."""
    dtype = jnp.dtype(dtype)
    if not floats.inexact(dtype):
      return floats.Float().for_leaf(shape, dtype, second=second)
    compute = floats.compute_dtype(dtype)
    if second:
      compute = floats.real_dtype(compute)
    complex_first = not second and jnp.issubdtype(dtype, jnp.complexfloating)
    if complex_first or not self.applies_to(math.prod(shape)):
      # Small leaves stay in the compute dtype, as in Dettmers et al.
      return floats.FloatLeaf(jnp.dtype(compute).name)
    return Int8Leaf(self.block_for(shape), self.n_blocks_for(shape),
                    signed=not second, stochastic=self.stochastic,
                    approximate_derivative=self.approximate_derivative)

  def __str__(self) -> str:
    return "int8" if self == BlockwiseInt8() else repr(self)

  def block_for(self, shape: tuple[int, ...]) -> int:
    """The block size of a parameter of ``shape`` (see ``row_blocks``)."""
    row = shape[-1] if len(shape) >= 2 else 0
    if not self.row_blocks or row <= 0 or row >= self.block_size:
      return self.block_size
    block = row & -row  # the largest power of two dividing the row
    return block if block >= MIN_ROW_BLOCK else self.block_size

  def n_blocks_for(self, shape: tuple[int, ...]) -> int:
    """How many blocks (scales) a parameter of ``shape`` has."""
    return -(-math.prod(shape) // self.block_for(shape))


# The smallest block a row of its own gets: 4 bytes of scale per 32 elements
# is an eighth of a byte per element on top of the code's one.
MIN_ROW_BLOCK = 32


@dataclasses.dataclass(frozen=True)
class Int8Leaf:
  """One moment of one parameter as an :class:`Int8Moment`.

  Attributes:
    block: elements per block.
    n_blocks: how many blocks (scales) the parameter has.
    signed: int8 codes of a first moment; else uint8 codes of √v.
    stochastic: round to a random neighbouring code (unbiased).
    approximate_derivative: see :class:`BlockwiseInt8`.
  """

  block: int
  n_blocks: int
  signed: bool
  stochastic: bool = True
  approximate_derivative: bool = False

  @property
  def root(self) -> bool:
    """The codes hold √v (second moments): a block's code map spans 7
    decades below its scale, 14 decades of v when the codes hold √v, so
    gradients spread over more than 3.5 decades inside a block no longer
    flush their smaller block-mates to the bottom of the map."""
    return not self.signed

  @property
  def rounds(self) -> bool:
    return True

  @property
  def code_dtype(self):
    return _codes.code_dtype(self.signed)

  def zeros(self, param: Any) -> Int8Moment:
    return Int8Moment(
        _placement.zeros_placed_like(param, param.shape, self.code_dtype),
        _placement.zeros_placed_like(param, (self.n_blocks,), jnp.float32,
                                    block=self.block))

  def boxed(self, box: Any, moment: Int8Moment) -> Int8Moment:
    """``moment`` with the codes in the parameter's Flax box and the scales
    in a box whose axis names fit a vector of blocks."""
    shape = tuple(_boxes.open_box(box).shape)
    return Int8Moment(_boxes.close_like(box, moment.codes), _boxes.box_scales(
        box, moment.scales, _placement.scales_follow_rows(shape, self.block)))

  def matches(self, stored: Any) -> bool:
    return (isinstance(stored, Int8Moment)
            and jnp.dtype(stored.codes.dtype) == self.code_dtype
            and tuple(stored.scales.shape) == (self.n_blocks,))

  def nbytes(self, shape: tuple[int, ...]) -> int:
    return math.prod(shape) + 4 * self.n_blocks

  def __str__(self) -> str:
    return f"int8 √v, block {self.block}" if self.root else (
        f"int8, block {self.block}")

  def load(self, moment: Int8Moment, dtype: Any) -> Array:
    """The moment decoded to ``dtype``, in the codes' shape."""
    codes, scales = moment
    view = _block_view(tuple(codes.shape), {self.block})

    def decode(codes, scales):
      return _read(codes, scales, view, self, dtype).reshape(codes.shape)
    explicit = _placement.explicit_shardings(codes)
    if explicit is not None:
      # As in :func:`step`: on Explicit mesh axes the blocks are cut inside
      # ``auto_axes``, and the values come back split like the codes.
      decode = _compat.auto_axes(decode, out_sharding=explicit)
    return decode(codes, scales)


def found(stored: Any, shape: tuple[int, ...]) -> Int8Leaf:
  """The :class:`Int8Leaf` an :class:`Int8Moment` of a parameter of
  ``shape`` was stored with (its block size read from the scales' count)."""
  n_blocks = int(stored.scales.shape[0])
  signed = jnp.dtype(stored.codes.dtype) == jnp.int8
  return Int8Leaf(_codes.block_size_of(math.prod(shape), n_blocks), n_blocks,
                  signed)


@jax.custom_jvp
def not_differentiable(tree: Any) -> Any:
  """``tree`` itself; differentiating through it raises a ``TypeError``.

  Guards the int8 codec's inputs: its codes are integers, so ``jax.grad``
  through them would be zero and a derivative through an int8 moment would
  be silently wrong (only the block scales carry one).
  """
  return tree


@not_differentiable.defjvp
def _not_differentiable_jvp(primals, tangents):
  del primals, tangents
  raise TypeError(
      "jadam: this optimizer stores a moment as int8 codes, which are "
      "integers, so differentiating through its update (jax.grad or jax.jvp "
      "of a loss after optimizer steps, as in meta-learning) would give a "
      "wrong derivative. Store the moments as float32, bfloat16 or float16 "
      "(their rounding is differentiated as the identity), or accept the "
      "approximate derivative through the block scales with "
      "mu_dtype/nu_dtype=jadam.BlockwiseInt8("
      "approximate_derivative=True) (its measured error is in "
      "docs/reliability.md).")


def step(g: Array, stored: tuple, t: Array, seed: tuple, offset: Any,
         scales: tuple, leaf: _rule.LeafRule, formats: tuple
         ) -> tuple[Array, tuple, tuple]:
  """One leaf's step when any of its moments is int8, without a tile loop.

  Args:
    g: the gradient.
    stored: per moment, its codes or float array.
    t: the step number.
    seed, offset: the leaf's rounding seed and its shard's offset in the
      stream (:mod:`jadam._rounding`).
    scales: per moment, its block scales (None for a float moment).
    leaf: the optimizer's step on one array.
    formats: per moment, its :class:`Int8Leaf` or ``FloatLeaf``.

  Returns:
    ``(direction, stored, scales)`` in the same layout.

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

  A skipped step (``leaf.skip``) keeps the old scales. A block whose bound
  is zero gets the smallest normal float32 instead: a positive scale that
  decodes its zero codes to zero. Scales are clipped to
  :data:`jadam._formats._codes.MAX_SCALE` (2^126, whose reciprocal is still a normal
  float32); rounding can put a value a few ulps above its bound, and
  encoding clips it to the top code.

  The direction and the moments come from the same rule on the same decoded
  values (up to the compiler's choice of fused multiply-adds).
  """
  dtype = floats.compute_dtype(g.dtype)
  dtypes = [floats.real_dtype(dtype) if second else dtype
            for second in leaf.real]
  blocks = [f.block if isinstance(f, Int8Leaf) else None for f in formats]
  view = _block_view(g.shape, set(blocks) - {None})
  flat_g = g.reshape(view).astype(dtype)

  def run_rule(flat_g, stored, scales):
    loaded = tuple(_read(x, s, view, f, d)
                   for x, s, f, d in zip(stored, scales, formats, dtypes))
    return leaf.step(flat_g, loaded, leaf.scalars)

  direction = leaf.direction(run_rule(flat_g, stored, scales)[0], flat_g)
  bounds = _scale_bounds(flat_g, scales, blocks, formats, leaf)
  values, new_scales = [], []
  for k, (x, old) in enumerate(zip(stored, scales)):
    # Each moment's codes from inputs of its own (see _own_inputs).
    inputs, streams = _rounding.own_inputs(
        (flat_g, stored, scales, bounds), view, seed, offset, k)
    value = run_rule(*inputs[:3])[1][k]
    block, scale, new_scale = blocks[k], inputs[3][k], bounds[k]
    if block is None:
      new_scale = old  # a float moment keeps its empty entry
    elif new_scale is None:
      top = jnp.sqrt(value) if formats[k].root else value
      new_scale = scale = _rule.hold(leaf.skip, _exact_scales(top, block),
                                     old)
    monotone = k < len(leaf.monotone) and leaf.monotone[k]
    values.append(_write(x, value, scale, streams[k], formats[k],
                         round_up=monotone))
    new_scales.append(new_scale)
  return (direction.reshape(g.shape).astype(g.dtype), tuple(values),
          tuple(new_scales))


def _scale_bounds(flat_g: Array, scales: tuple, blocks: list, formats: tuple,
                  leaf: _rule.LeafRule) -> tuple:
  """The new block scales of the int8 moments for which ``leaf.bounds``
  gives an upper bound (None for the others): the rule's bounds from each
  block's largest finite |g| (G) and its old scales, clipped to
  [smallest normal float32, :data:`jadam._codes.MAX_SCALE`], and the old
  scales where a step is skipped.

  G leaves out gradients above ``_fusion.LARGEST_G`` (2^63, whose square would
  exceed 2^126): their v is +inf, stored as its own code, so they do not
  inflate their block's scale.
  """
  if leaf.bounds is None or all(block is None for block in blocks):
    return tuple(None for _ in blocks)
  smallest = min(block for block in blocks if block is not None)
  g_max = {smallest: _fusion.block_max_abs(flat_g, smallest)}
  for block in set(blocks) - {smallest, None}:
    g_max[block] = jnp.max(_codes.to_blocks(g_max[smallest],
                                            block // smallest), axis=1)
  # The codes of second moments hold √v and their scales bound √v: the
  # rule's recurrences see and give v-domain bounds.
  roots = [block is not None and f.root for block, f in zip(blocks, formats)]
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
    bound = jnp.clip(bound, jnp.finfo(jnp.float32).tiny, _codes.MAX_SCALE)
    out.append(_rule.hold(leaf.skip, bound, old))
  return tuple(out)


def _exact_scales(value: Array, block: int) -> Array:
  """Block scales from the exact largest finite |value| of each block (for a
  moment whose recurrence gives no bound), clipped as bounds are."""
  magnitude = jnp.abs(value).astype(jnp.float32)
  magnitude = jnp.where(jnp.isfinite(magnitude), magnitude, 0)
  if magnitude.ndim > 1:  # a block view: blocks are the last axis
    top = jnp.max(magnitude, axis=-1).reshape(-1)
  else:
    top = _fusion.concat([jnp.max(part, axis=1)
                   for part in _fusion.blocks(magnitude, block)])
  return jnp.clip(top, jnp.finfo(jnp.float32).tiny, _codes.MAX_SCALE)



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


def _read(stored: Array, scales: Optional[Array], view: tuple[int, ...],
          fmt: Any, dtype: Any) -> Array:
  """A stored moment, of shape ``view``, in the compute ``dtype``."""
  flat = stored.reshape(view)
  if not isinstance(fmt, Int8Leaf):
    return fmt.load(flat, dtype)
  values = _codes.decode(flat) * _per_element(scales, fmt.block, view)
  if fmt.root:
    values = values * values  # the codes hold √v
  return values.astype(dtype)


def _write(stored: Array, value: Array, scales: Optional[Array],
           bits: Array, fmt: Any, round_up: bool = False) -> Array:
  """The flat compute-dtype ``value`` rounded into ``stored``'s format, with
  the new block ``scales`` for codes (rounded up with ``round_up``: AMSGrad's
  running maximum must not decrease through rounding)."""
  if not isinstance(fmt, Int8Leaf):
    return fmt.store(value, bits).reshape(stored.shape)
  if fmt.root:
    value = jnp.sqrt(value)  # the codes hold √v, scales bound √v
  # A multiply by each block's reciprocal scale rather than a division:
  # XLA:CPU does not fuse a division into a consumer that uses its result
  # several times (as encoding does), and would store y in float32.
  y = value.astype(jnp.float32) * _per_element(1 / scales, fmt.block,
                                               value.shape)
  codes = _codes.encode(y, fmt.signed, bits if fmt.stochastic else None,
                        round_up=round_up,
                        positive=None if fmt.signed else value > 0)
  return codes.reshape(stored.shape)

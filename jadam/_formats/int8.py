"""Block-wise int8 storage (Dettmers et al., ICLR 2022): the format, its
blocks and the step of a leaf with int8 moments; code maps in ``_codes``."""

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
  """A moment stored as block-wise int8 codes: one leaf of a state.

  A NamedTuple, so JAX, orbax, ``flax.serialization`` and pickle round-trip
  it; map over it with ``is_leaf=lambda x: isinstance(x, jadam.Int8Moment)``.

  Attributes:
    codes: int8 (m) or uint8 (√v), the parameter's shape and Flax box.
    scales: float32 ``(n_blocks,)``, upper bounds of the blocks' largest
      finite |value|, split like the rows where no block spans two.
  """

  codes: Any
  scales: Any


@dataclasses.dataclass(frozen=True)
class BlockwiseInt8:
  """Block-wise int8 storage of a moment: the ``"int8"`` format.

  Pass it as ``mu_dtype``/``nu_dtype`` of any jadam optimizer (``"int8"`` is
  ``BlockwiseInt8()``); each moment becomes an ``Int8Moment``.

  Attributes:
    block_size: elements per scale, a power of two; smaller blocks isolate
      outliers better and cost 4/block_size bytes per element.
    min_size: parameters with fewer elements keep this moment in float32.
    stochastic: round to a random neighbouring code (unbiased), or nearest.
    row_blocks: rows (last axis) shorter than ``block_size`` get blocks of
      their own (at least 32), so rare embedding rows keep their own scale.
    approximate_derivative: let ``jax.grad`` through, via the scales only;
      False raises a ``TypeError`` rather than give a wrong derivative.

  Example:
    >>> import jadam
    >>> opt = jadam.adam(1e-3, mu_dtype=jadam.BlockwiseInt8(block_size=128),
    ...                  nu_dtype="int8")

  References:
    Dettmers, Lewis, Shleifer & Zettlemoyer, "8-bit Optimizers via
    Block-wise Quantization", ICLR 2022 (arXiv:2110.02861).
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
    """An ``Int8Leaf``, or a ``FloatLeaf`` where int8 does not apply."""
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
    """The block size for ``shape`` (see ``row_blocks``)."""
    row = shape[-1] if len(shape) >= 2 else 0
    if not self.row_blocks or row <= 0 or row >= self.block_size:
      return self.block_size
    block = row & -row  # the largest power of two dividing the row
    return block if block >= MIN_ROW_BLOCK else self.block_size

  def n_blocks_for(self, shape: tuple[int, ...]) -> int:
    return -(-math.prod(shape) // self.block_for(shape))


# The smallest row block: its scale costs 1/8 byte per element.
MIN_ROW_BLOCK = 32


@dataclasses.dataclass(frozen=True)
class Int8Leaf:
  """A moment as an ``Int8Moment``: codes of m if ``signed``, else of √v."""

  block: int
  n_blocks: int
  signed: bool
  stochastic: bool = True
  approximate_derivative: bool = False

  @property
  def root(self) -> bool:
    """Codes of √v: the map's 7 decades hold 14 decades of v."""
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
    """Codes in the parameter's Flax box, scales in one for blocks."""
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

  def round_trip(self, value: Array) -> Array:
    """``value`` encoded with its blocks' exact maxima and nearest codes,
    then decoded: the error this format adds, for the numerics doctor
    (the stored codes use a bound at least the maximum, so at most as
    fine)."""
    top = jnp.sqrt(value) if self.root else value
    codes, scales = _codes.quantize(top, self.signed, self.block)
    out = _codes.dequantize(codes, scales)
    return (out * out if self.root else out).astype(value.dtype)

  def load(self, moment: Int8Moment, dtype: Any) -> Array:
    codes, scales = moment
    view = _block_view(tuple(codes.shape), {self.block})

    def decode(codes, scales):
      return _read(codes, scales, view, self, dtype).reshape(codes.shape)
    explicit = _placement.explicit_shardings(codes)
    if explicit is not None:
      # Blocks are cut inside auto_axes on Explicit mesh axes, as in step.
      decode = _compat.auto_axes(decode, out_sharding=explicit)
    return decode(codes, scales)


def found(stored: Any, shape: tuple[int, ...]) -> Int8Leaf:
  """The ``Int8Leaf`` a stored moment was kept with, read from its arrays."""
  n_blocks = int(stored.scales.shape[0])
  signed = jnp.dtype(stored.codes.dtype) == jnp.int8
  return Int8Leaf(_codes.block_size_of(math.prod(shape), n_blocks), n_blocks,
                  signed)


@jax.custom_jvp
def not_differentiable(tree: Any) -> Any:
  """``tree``, but a derivative through it (integer codes) is a TypeError."""
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
  """One leaf's step with int8 moments: ``(direction, stored, scales)``.

  An exact block maximum would cost a pass of its own, slow on XLA:CPU, so
  where ``leaf.bounds`` gives one the new scale is an upper bound from the
  old one and the block's largest |g|. The rest is elementwise loops that
  decode on the fly, so no moment is ever held in float32.
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
  """New scales from ``leaf.bounds`` (None where it has none), clipped to
  [smallest normal float32, ``MAX_SCALE``], kept on skipped steps."""
  if leaf.bounds is None or all(block is None for block in blocks):
    return tuple(None for _ in blocks)
  smallest = min(block for block in blocks if block is not None)
  g_max = {smallest: _fusion.block_max_abs(flat_g, smallest)}
  for block in set(blocks) - {smallest, None}:
    g_max[block] = jnp.max(_codes.to_blocks(g_max[smallest],
                                            block // smallest), axis=1)
  # Bounds are in v's domain; the scales of √v codes bound √v.
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
  """Scales from each block's exact largest finite |value| (no bound)."""
  magnitude = jnp.abs(value).astype(jnp.float32)
  magnitude = jnp.where(jnp.isfinite(magnitude), magnitude, 0)
  if magnitude.ndim > 1:  # a block view: blocks are the last axis
    top = jnp.max(magnitude, axis=-1).reshape(-1)
  else:
    top = _fusion.concat([jnp.max(part, axis=1)
                   for part in _fusion.blocks(magnitude, block)])
  return jnp.clip(top, jnp.finfo(jnp.float32).tiny, _codes.MAX_SCALE)


def _block_view(shape: tuple[int, ...], blocks: set) -> tuple[int, ...]:
  """``shape[:-1] + (k, block)`` when the last axis is whole blocks, so that
  every sharded axis survives (a flat view lost one); else ``(n,)``."""
  n = math.prod(shape)
  if len(shape) >= 2 and len(blocks) == 1:
    (block,) = blocks
    if shape[-1] % block == 0:
      return tuple(shape[:-1]) + (shape[-1] // block, block)
  return (n,)


def _per_element(scales: Array, block: int, view: tuple[int, ...]) -> Array:
  """Each element's block scale, a broadcast fused into its consumer."""
  if len(view) > 1:
    return jax.lax.broadcast_in_dim(scales.reshape(view[:-1]), view,
                                    tuple(range(len(view) - 1)))
  n_blocks = scales.shape[0]
  spread = jax.lax.broadcast_in_dim(scales, (n_blocks, block), (0,))
  return spread.reshape(-1)[:view[0]]


def _read(stored: Array, scales: Optional[Array], view: tuple[int, ...],
          fmt: Any, dtype: Any) -> Array:
  """A stored moment, of shape ``view``, in ``dtype``."""
  flat = stored.reshape(view)
  if not isinstance(fmt, Int8Leaf):
    return fmt.load(flat, dtype)
  values = _codes.decode(flat) * _per_element(scales, fmt.block, view)
  if fmt.root:
    values = values * values  # the codes hold √v
  return values.astype(dtype)


def _write(stored: Array, value: Array, scales: Optional[Array],
           bits: Array, fmt: Any, round_up: bool = False) -> Array:
  """``value`` encoded with the new ``scales`` (``round_up`` for AMSGrad)."""
  if not isinstance(fmt, Int8Leaf):
    return fmt.store(value, bits).reshape(stored.shape)
  if fmt.root:
    value = jnp.sqrt(value)  # the codes hold √v, scales bound √v
  # A multiply by the reciprocal, not a division: XLA:CPU does not fuse a
  # division into a consumer that reads it several times (y would be stored).
  y = value.astype(jnp.float32) * _per_element(1 / scales, fmt.block,
                                               value.shape)
  codes = _codes.encode(y, fmt.signed, bits if fmt.stochastic else None,
                        round_up=round_up,
                        positive=None if fmt.signed else value > 0)
  return codes.reshape(stored.shape)

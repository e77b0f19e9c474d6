"""One pass over memory per Adam step on XLA:CPU.

An Adam step on one leaf reads the parameter, the gradient and both moments
and writes the parameter and both moments: 28 bytes per float32 parameter if
every array is touched once. XLA:CPU emits one loop per array it writes. By
default the parameter loop then reads the *new* moments that the two moment
loops have just written, 40 bytes per parameter in three passes, and this is
what keeps ``optax.adam`` and a naive flat Adam well above the copy
bandwidth floor (docs/performance.md).

XLA has a multi-output fusion pass for the CPU that merges *sibling* loops,
loops that read the same arrays, into one loop with several outputs. It is
off by default; :func:`enable_cpu_fusion` turns it on for the process. On its
own it only merges the two moment loops (36 bytes), because the parameter
loop is their consumer, not their sibling. So when the pass is on, jadam
computes the direction a second time from the same loaded inputs, passed
through :func:`alias` (a multiply by a 1 the compiler cannot see through),
instead of reusing the new moments. The parameter loop and the moment loops
then read the same arrays and merge into one loop that writes all three, 28
bytes per parameter, both cores busy. The arithmetic is the one rule,
called twice on equal values, so the moments stored and the direction used
agree (to the last bit, up to the compiler's choice of fused multiply-adds).

Without the pass the duplicated work would not merge and would cost a fourth
loop, so jadam checks, once per process, that the pass is really active in
the compiler (a probe compilation) before it computes anything twice. Other
backends fuse producers into consumers themselves and keep the plain form.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

# The XLA backend option that switches on CPU multi-output fusion. It is a
# key of the ``xla_backend_extra_options`` map, which per-compilation
# ``compiler_options`` cannot set: it has to come from ``XLA_FLAGS``.
OPTION = "xla_cpu_use_multi_output_fusion"
_EXTRA = "--xla_backend_extra_options="


def _with_option(flags: str) -> str:
  """``flags`` (an ``XLA_FLAGS`` value) with :data:`OPTION` added."""
  parts = flags.split()
  for i, part in enumerate(parts):
    if part.startswith(_EXTRA):
      options = [o for o in part[len(_EXTRA):].split(",") if o]
      if OPTION not in options:
        parts[i] = _EXTRA + ",".join(options + [OPTION])
      return " ".join(parts)
  return " ".join(parts + [_EXTRA + OPTION])


def enable_cpu_fusion() -> None:
  """Let XLA:CPU write parameters and moments in one pass (CPU only).

  Adds ``--xla_backend_extra_options=xla_cpu_use_multi_output_fusion`` to
  ``XLA_FLAGS`` (keeping anything already there) and checks that the
  compiler took it. XLA reads its flags once, when JAX first uses a backend,
  so call this at the top of the program, after imports but before any JAX
  computation; setting the variable in the shell works as well. The option
  applies to every computation in the process (it can merge other sibling
  loops too; measured on the LM training step in ``docs/benchmarks.md``).
  It changes nothing on GPU or TPU, whose compilers already fuse this way.

  Raises:
    RuntimeError: if JAX had already compiled something with the default
      flags, so the option cannot take effect any more in this process.

  Example:
    >>> import jadam
    >>> jadam.enable_cpu_fusion()  # before the first jit
  """
  os.environ["XLA_FLAGS"] = _with_option(os.environ.get("XLA_FLAGS", ""))
  cpu_fusion_active.cache_clear()
  if jax.default_backend() == "cpu" and not cpu_fusion_active():
    raise RuntimeError(
        "XLA:CPU multi-output fusion could not be enabled: JAX already "
        "initialised its backend with the old XLA_FLAGS. Call "
        "jadam.enable_cpu_fusion() before the first JAX computation, or "
        f"start Python with XLA_FLAGS={_EXTRA}{OPTION}.")


@functools.cache
def cpu_fusion_active() -> bool:
  """Whether the CPU compiler merges sibling loops (checked once, by
  compiling two products of one array and looking for one fusion with two
  outputs)."""
  if jax.default_backend() != "cpu":
    return False
  x = jax.ShapeDtypeStruct((4096,), jnp.float32)
  text = jax.jit(lambda a: (a * 2.0, a * 3.0)).lower(x).compile().as_text()
  return re.search(r"= \([^=]*\) fusion\(", text) is not None


# Leaves smaller than this keep the plain form: their three loops run out of
# cache, so one pass saves little time, while the second copy of the rule
# costs compile time on trees of thousands of leaves (docs/performance.md).
MIN_SIZE = 1 << 16


def single_pass(size: int) -> bool:
  """Whether to compute the direction of a leaf of ``size`` elements from
  :func:`alias`-ed inputs."""
  return size >= MIN_SIZE and cpu_fusion_active()


def alias(tree: Any, tag: int = 0) -> Any:
  """``tree`` with every array multiplied by an opaque 1.

  The values are unchanged bit for bit (``x·1 = x`` for every float,
  infinities and NaN included, and every integer), but the compiler sees new
  arrays, so it neither merges a computation on them with the same
  computation on the originals nor folds the multiply away. Copies made with
  different ``tag`` values are opaque to each other as well. (The 1 of an
  integer array must not multiply a constant 0, which XLA folds.)
  """
  tag = jnp.asarray(tag, jnp.int32)
  def leaf(x):
    one, _ = jax.lax.optimization_barrier((jnp.ones((), x.dtype), tag))
    return x * one
  return jax.tree.map(leaf, tree)


def separate(tree: Any, tag: int) -> tuple[Any, Any]:
  """``tree`` :func:`alias`-ed under ``tag``, and an opaque 0 (uint32) behind
  the same barrier, when XLA:CPU multi-output fusion is on; ``(tree, 0)``
  otherwise.

  A loop that computes one stored moment from such inputs (and from random
  bits drawn at the returned offset) shares nothing with the loops that
  write the direction and the other moments. With multi-output fusion on, a
  shared value (new moments, per-element scales, random bits) would be
  written out in float32 or uint32 for the whole leaf, and the loops would
  be slower. With it off XLA recomputes elementwise producers in each
  consumer anyway, and the multiplies by one would cost time (an 8-bit
  multiply has no vector instruction on x86), so nothing is done.
  """
  if not cpu_fusion_active():
    return tree, 0
  tree, one = alias((tree, jnp.uint32(1)), tag)
  return tree, one - 1


# ---------------------------------------------------------------------------
# Block maxima of a gradient, in the form XLA:CPU reduces fast (int8 scales).


def blocks(flat: Array, block: int) -> list[Array]:
  """``flat`` as (blocks, block) arrays: the whole blocks, then the shorter
  last block if any, so that nothing is padded (a copy)."""
  n = flat.shape[0]
  whole = n - n % block
  parts = [flat[:whole].reshape(-1, block)] if whole else []
  if whole < n:
    parts.append(flat[whole:].reshape(1, -1))
  return parts


def concat(parts: list[Array]) -> Array:
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


# Gradients larger than this (whose square would exceed MAX_SCALE, 2^126)
# are left out of the block maxima behind the int8 scale bounds: such an
# element's v is +inf (a code of its own, a zero step, as with float32
# moments), and the scale stays that of its block-mates.
LARGEST_G = 2.0**63


def block_max_abs(flat: Array, block: int) -> Array:
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
  parts = blocks(flat, block)

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
    # vmap, see jadam._engine.walk, it would run both sides).
    return concat([finite_max(p) for p in parts])
  if view.ndim > 1:
    # The healthy path on the block view, so that the reduction keeps the
    # parameter's sharding; the rare fallback below works on the flat leaf.
    fast = jnp.maximum(jnp.max(view, axis=-1),
                       -jnp.min(view, axis=-1)).astype(jnp.float32).reshape(-1)
  else:
    fast = concat([jnp.maximum(jnp.max(p, axis=1), -jnp.min(p, axis=1))
                    .astype(jnp.float32) for p in parts])
  return jax.lax.cond(jnp.all(fast <= LARGEST_G), lambda: fast,
                      lambda: concat([tiled_finite_max(p) for p in parts]))


# Elements per tile of the block maxima of a gradient with non-finite values.
FALLBACK_TILE = 1 << 18

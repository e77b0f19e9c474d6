"""The XLA:CPU policy, in one seam: one pass over memory per Adam step.

XLA:CPU's multi-output fusion (off by default; ``enable_cpu_fusion``) merges
only loops that read the same arrays, and the parameter loop reads the new
moments. So with it on, jadam computes the direction a second time from
``alias``-ed copies of the inputs, and all loops merge into one.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

Array = jax.Array

# A key of ``xla_backend_extra_options``, which per-compilation
# ``compiler_options`` cannot set: it has to come from ``XLA_FLAGS``.
OPTION = "xla_cpu_use_multi_output_fusion"
_EXTRA = "--xla_backend_extra_options="


def _with_option(flags: str) -> str:
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
  ``XLA_FLAGS`` and checks that the compiler took it; XLA reads its flags
  once, so call it before any JAX computation. It affects the whole process.

  Raises:
    RuntimeError: if JAX has already compiled with the old flags.

  Example:
    >>> import jadam
    >>> jadam.enable_cpu_fusion()  # before the first jit  # doctest: +SKIP
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
  """Whether XLA:CPU merges sibling loops (probed once, by compiling)."""
  if jax.default_backend() != "cpu":
    return False
  x = jax.ShapeDtypeStruct((4096,), jnp.float32)
  text = jax.jit(lambda a: (a * 2.0, a * 3.0)).lower(x).compile().as_text()
  return re.search(r"= \([^=]*\) fusion\(", text) is not None


# Smaller leaves run from cache; a second rule would only cost compile time.
MIN_SIZE = 1 << 16


def single_pass(size: int) -> bool:
  return size >= MIN_SIZE and cpu_fusion_active()


def alias(tree: Any, tag: int = 0) -> Any:
  """``tree`` times an opaque 1 (per ``tag``): the same bits, but XLA can
  neither merge work on it with work on the originals nor fold it. (XLA
  folds an integer array's 1 if it multiplies a constant 0.)"""
  tag = jnp.asarray(tag, jnp.int32)
  def leaf(x):
    one, _ = jax.lax.optimization_barrier((jnp.ones((), x.dtype), tag))
    return x * one
  return jax.tree.map(leaf, tree)


def one_pass(step: Callable, inputs: tuple, new: tuple, streams: Any,
             own_inputs: Optional[Callable] = None) -> tuple:
  """A leaf step written so that XLA:CPU merges its loops into one pass.

  The direction is computed again from aliased ``inputs`` rather than from
  the new moments, so no loop waits for another's output. Where moments are
  rounded, each is computed from its own opaque copy of the inputs and bits
  (``own_inputs(tag) -> (inputs, streams)``), so the loops share nothing.
  Returns ``(direction, new, streams)``; same values, another schedule.
  """
  direction, _ = step(*alias(inputs))
  if own_inputs is None:
    return direction, new, streams
  parts = []
  for k in range(len(new)):
    inputs_k, streams_k = own_inputs(k + 1)
    parts.append((step(*inputs_k)[1][k], streams_k[k]))
  return direction, tuple(p[0] for p in parts), [p[1] for p in parts]


def separate(tree: Any, tag: int) -> tuple[Any, Any]:
  """``(alias(tree, tag), opaque 0)`` under multi-output fusion, else ``(tree,
  0)``: a loop sharing values with others would write them out in full."""
  if not cpu_fusion_active():
    return tree, 0
  tree, one = alias((tree, jnp.uint32(1)), tag)
  return tree, one - 1


def blocks(flat: Array, block: int) -> list[Array]:
  """``flat`` as ``(blocks, block)`` arrays, the short last block apart."""
  n = flat.shape[0]
  whole = n - n % block
  parts = [flat[:whole].reshape(-1, block)] if whole else []
  if whole < n:
    parts.append(flat[whole:].reshape(1, -1))
  return parts


def concat(parts: list[Array]) -> Array:
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


# Gradients above this (g² > MAX_SCALE) are left out of the block maxima:
# their v is +inf, a code of its own, and their block keeps its scale.
LARGEST_G = 2.0**63


def block_max_abs(flat: Array, block: int) -> Array:
  """The largest |x| <= ``LARGEST_G`` per block (complex: by modulus).

  XLA:CPU writes out any elementwise function before reducing it, so this
  reduces g itself (max, -min), redoing it by tiles only if needed."""
  if jnp.iscomplexobj(flat):
    flat = jnp.abs(flat)
  def finite_max(part):
    magnitude = jnp.abs(part)
    part = jnp.where(magnitude <= LARGEST_G, magnitude, 0)  # NaN: False
    return jnp.max(part, axis=-1).astype(jnp.float32)
  if flat.ndim > 1 and flat.size <= FALLBACK_TILE:
    # A block view (see int8._block_view): keeps the parameter's sharding.
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
    # In cache |x| is cheap; a branch costs compile time (and vmap runs both).
    return concat([finite_max(p) for p in parts])
  if view.ndim > 1:
    # The block view keeps the parameter's sharding on the healthy path.
    fast = jnp.maximum(jnp.max(view, axis=-1),
                       -jnp.min(view, axis=-1)).astype(jnp.float32).reshape(-1)
  else:
    fast = concat([jnp.maximum(jnp.max(p, axis=1), -jnp.min(p, axis=1))
                    .astype(jnp.float32) for p in parts])
  return jax.lax.cond(jnp.all(fast <= LARGEST_G), lambda: fast,
                      lambda: concat([tiled_finite_max(p) for p in parts]))


# Elements per tile of the block maxima of a gradient with non-finite values.
FALLBACK_TILE = 1 << 18

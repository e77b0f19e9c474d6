"""One pass over memory per Adam step on XLA:CPU.

An Adam step on one leaf reads the parameter, the gradient and both moments
and writes the parameter and both moments: 28 bytes per float32 parameter if
every array is touched once. XLA:CPU emits one loop per array it writes. By
default the parameter loop then reads the *new* moments that the two moment
loops have just written, 40 bytes per parameter in three passes, and this is
what keeps ``optax.adam`` and a naive flat Adam at about 1.5x the copy
bandwidth floor.

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
# costs compile time on trees of thousands of leaves (measured on
# many_2000x8k: 23.5 s instead of 13 s to compile, the same step time).
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

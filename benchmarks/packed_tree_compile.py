"""An experiment kept for the record (docs/memory.md, "Compile time"): does
packing a tree's leaves into one buffer *inside* the compiled step make
narrow moments compile like float32?

The state stays one array per leaf (as the package keeps it); the step
concatenates the gradients, moments and int8 scales of all leaves, runs one
jadam update on the packed buffer and slices the results back. Leaves of
4096 elements are whole int8 blocks, so the numbers are the same as leaf by
leaf; only the program differs.

  python benchmarks/packed_tree_compile.py 200 int8          # leaf by leaf
  python benchmarks/packed_tree_compile.py 200 int8 packed   # packed
  python benchmarks/packed_tree_compile.py 200 int8 barrier  # packed, with
      # the packed buffers materialised (optimization barriers), so that
      # the concatenation is not fused into the loops that read it
  python benchmarks/packed_tree_compile.py 200 int8 stacked  # the leaves
      # (all of one shape) stacked on a new axis, one update under
      # jax.vmap, the results indexed back out: the program of a tree walk
      # that groups leaves of one shape

Prints the time to compile the donated training step, the process's peak
RSS and the median of 15 steps.
"""

import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jadam

SIZE = 4096
STORAGES = {"float32": {},
            "bfloat16": dict(mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
            "int8": dict(mu_dtype="int8", nu_dtype="int8")}


def main():
  n_leaves, storage = int(sys.argv[1]), sys.argv[2]
  how = sys.argv[3] if len(sys.argv) > 3 else "leaves"
  tx = jadam.scale_by_adam(**STORAGES[storage])
  params = {f"l{i:05d}": jnp.full((SIZE,), 0.01 * (i % 7 + 1))
            for i in range(n_leaves)}
  state = tx.init(params)
  barrier = (jax.lax.optimization_barrier if how == "barrier"
             else lambda x: x)

  def is_tree(x):
    return isinstance(x, dict)

  def pack(tree):
    return {"all": barrier(jnp.concatenate(jax.tree.leaves(tree)))}

  def unpack(packed, like):
    flat, treedef = jax.tree.flatten(like)
    buffer, out, start = barrier(packed["all"]), [], 0
    for leaf in flat:
      out.append(buffer[start:start + leaf.size].reshape(leaf.shape))
      start += leaf.size
    return treedef.unflatten(out)

  def stack(tree):
    return {"all": jnp.stack(jax.tree.leaves(tree))}

  def unstack(stacked, like):
    flat, treedef = jax.tree.flatten(like)
    return treedef.unflatten([stacked["all"][i] for i in range(len(flat))])

  def update(grads, state):
    if how == "leaves":
      return tx.update(grads, state)
    if how == "stacked":
      stacked_state = jax.tree.map(lambda t: stack(t) if is_tree(t) else t,
                                   state, is_leaf=is_tree)
      axes = jax.tree.map(lambda t: {"all": 0} if is_tree(t) else None,
                          state, is_leaf=is_tree)
      updates, new = jax.vmap(tx.update, in_axes=(0, axes),
                              out_axes=(0, axes))(stack(grads), stacked_state)
      new = jax.tree.map(lambda t, like: unstack(t, like) if is_tree(t)
                         else t, new, state, is_leaf=is_tree)
      return unstack(updates, grads), new
    packed_state = jax.tree.map(lambda t: pack(t) if is_tree(t) else t,
                                state, is_leaf=is_tree)
    updates, new = tx.update(pack(grads), packed_state)
    new = jax.tree.map(lambda t, like: unpack(t, like) if is_tree(t) else t,
                       new, state, is_leaf=is_tree)
    return unpack(updates, grads), new

  def step(grads, state, params):
    updates, state = update(grads, state)
    return jax.tree.map(lambda p, u: p - 1e-3 * u, params, updates), state

  lowered = jax.jit(step, donate_argnums=(1, 2)).lower(params, state, params)
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  grads = jax.tree.map(lambda x: 0.5 * x + 1e-3, params)
  for _ in range(3):
    params, state = compiled(grads, state, params)
  times = []
  for _ in range(15):
    start = time.perf_counter()
    params, state = compiled(grads, state, params)
    jax.block_until_ready(params)
    times.append(time.perf_counter() - start)
  print(f"{n_leaves} leaves, {storage}, {how}: compile {compile_s:.2f} s, "
        f"peak RSS {rss_mib:.0f} MiB, step {np.median(times) * 1e3:.2f} ms")


if __name__ == "__main__":
  main()

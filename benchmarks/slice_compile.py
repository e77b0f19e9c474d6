"""How compile time grows when one packed buffer is returned as slices
(docs/memory.md, "Compile time"): N arrays of 4096 float32, x·2 + 1.

  python benchmarks/slice_compile.py 200 leaves      # leaf by leaf
  python benchmarks/slice_compile.py 200 packed      # concatenated, returned whole
  python benchmarks/slice_compile.py 200 roundtrip   # concatenated, returned as N slices
"""

import sys
import time

import jax
import jax.numpy as jnp

SIZE = 4096


def main():
  n, how = int(sys.argv[1]), sys.argv[2]
  arrays = [jax.ShapeDtypeStruct((SIZE,), jnp.float32) for _ in range(n)]

  def program(arrays):
    if how == "leaves":
      return [2 * x + 1 for x in arrays]
    packed = 2 * jnp.concatenate(arrays) + 1
    if how == "packed":
      return packed
    return [packed[i * SIZE:(i + 1) * SIZE] for i in range(n)]

  lowered = jax.jit(program).lower(arrays)
  start = time.perf_counter()
  lowered.compile()
  print(f"{n} arrays, {how}: compile {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
  main()

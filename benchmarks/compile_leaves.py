"""Trace and compile time of one jitted ``jadam.adam`` update on N leaves.

N leaves of 8192 float32 parameters, moments stored as float32, bfloat16 or
int8; prints one JSON line. Compare checkouts side by side:

    PYTHONPATH=<checkout> python benchmarks/compile_leaves.py 500 bfloat16
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp

import jadam
from step_and_compile import FORMATS  # a sibling script (benchmarks/)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("leaves", type=int)
  parser.add_argument("moments", choices=sorted(FORMATS))
  args = parser.parse_args()
  params = {f"w{i:05d}": jnp.ones((8192,)) for i in range(args.leaves)}
  tx = jadam.adam(1e-3, **FORMATS[args.moments])
  state = tx.init(params)
  start = time.perf_counter()
  lowered = jax.jit(tx.update).lower(params, state, params)
  traced = time.perf_counter()
  lowered.compile()
  done = time.perf_counter()
  print(json.dumps({"leaves": args.leaves, "moments": args.moments,
                    "trace_s": round(traced - start, 2),
                    "compile_s": round(done - traced, 2),
                    "jax": jax.__version__}))


if __name__ == "__main__":
  main()

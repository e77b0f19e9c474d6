"""Step time and compile time of jadam.adam per storage format, on two trees.

One large leaf (step time at memory bandwidth) and many small leaves (trace
and compile time), for float32, bfloat16 and int8 moments. Prints one JSON
line per case, so that two checkouts can be compared side by side:

    PYTHONPATH=<checkout A> python benchmarks/step_and_compile.py
    PYTHONPATH=<checkout B> python benchmarks/step_and_compile.py

Only public API is used. Medians over ``--repeats`` timed groups of
``--steps`` steps.
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

import jadam

FORMATS = {"float32": {}, "bfloat16": dict(mu_dtype=jnp.bfloat16,
                                           nu_dtype=jnp.bfloat16),
           "int8": dict(mu_dtype="int8", nu_dtype="int8")}


def trees(size: str) -> dict:
  big = 1 << (22 if size == "small" else 24)
  return {"one_leaf": {"w": jnp.ones((big // 1024, 1024))},
          "400_leaves": {f"l{i}": jnp.ones((64, 64 * (1 + i % 5)))
                         for i in range(400)}}


def measure(params: dict, kwargs: dict, steps: int, repeats: int) -> dict:
  tx = jadam.adam(1e-3, **kwargs)
  state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return jax.tree.map(jnp.add, params, updates), state

  start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, state, grads).compile()
  compile_s = time.perf_counter() - start
  params = jax.tree.map(jnp.copy, params)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      params, state = compiled(params, state, grads)
    jax.block_until_ready(params)
    times.append((time.perf_counter() - start) / steps)
  return {"compile_s": round(compile_s, 3),
          "step_ms": round(1e3 * statistics.median(times), 3)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", choices=("small", "default"),
                      default="default")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  for tree_name, params in trees(args.size).items():
    for fmt, kwargs in FORMATS.items():
      row = {"tree": tree_name, "format": fmt, "jax": jax.__version__}
      row.update(measure(params, kwargs, args.steps, args.repeats))
      print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()

"""What the compiler makes of one optimizer step, without running it: the
number of kernels per step and the bytes they access, from XLA's compiled
cost analysis (docs/performance.md, "On a GPU or TPU").

Each row compiles the donated step ``update`` + ``apply_updates`` of
``python -m benchmarks.bench`` on the tree's shapes (nothing is allocated, so
the 1.1B-parameter tree compiles on any machine), with XLA:CPU's
multi-output fusion on, as the benchmark runs it. Columns:

* ``kernels``: instructions of the compiled entry computation that run as
  a kernel or a copy (fusions, copies, custom calls, reductions), i.e. the
  loops one step launches.
* ``B/param``: XLA's ``bytes accessed`` for the whole step over the number
  of parameters; 28 is the float32 floor (read θ, g, m, v; write θ, m, v).
* ``compile s``: XLA compile time (after tracing and lowering).

  python benchmarks/compiled_cost.py                       # --size large
  python benchmarks/compiled_cost.py gpt2_small many_1000x64k

The counts are the CPU compiler's: XLA:GPU builds its own program (it
merges producers into reductions and has a horizontal fusion of small
loops), so they say what a step asks of memory on this compiler, not how a
GPU will time it.
"""

import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import optax

import jadam
if __package__ in (None, ""):
  # Run as a script: the clone's root is where ``benchmarks`` lives.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))

from benchmarks import bench  # pylint: disable=wrong-import-position

_LR = bench.LEARNING_RATE
# name -> (optimizer factory, on the flat view)
ROWS = {
    "jadam (flat)": (lambda: jadam.adam(_LR), True),
    "jadam_tree": (lambda: jadam.adam(_LR), False),
    "optax": (lambda: optax.adam(_LR), False),
    "jadam_skip_nonfinite (flat)": (
        lambda: jadam.skip_nonfinite(jadam.adam(_LR)), True),
    "jadam_telemetry (flat)": (
        lambda: jadam.with_telemetry(jadam.adam(_LR)), True),
    "jadam_bf16 (flat)": (bench._adam_storing("bfloat16"), True),
    "jadam_int8 (flat)": (bench._adam_storing("int8"), True),
}
_NOT_KERNELS = {"parameter", "constant", "tuple", "get-tuple-element",
                "bitcast"}


def _kernels(hlo_text: str) -> int:
  entry = hlo_text[hlo_text.index("\nENTRY"):]
  entry = entry[:entry.index("\n}")]
  ops = re.findall(r"^\s*(?:ROOT )?%\S+ = .*? ([a-z][a-z0-9\-]*)\(", entry,
                   flags=re.MULTILINE)
  return sum(1 for op in ops if op not in _NOT_KERNELS)


def measure(tree: str, row: str) -> tuple[int, float, float]:
  make_opt, flat = ROWS[row]
  shapes = bench.TREES[tree](False)
  params = {name: jax.ShapeDtypeStruct(shape, jnp.float32)
            for name, shape in shapes.items()}
  n_params = sum(x.size for x in params.values())
  if flat:
    params = jax.eval_shape(jadam.FlatView(params).ravel, params)
  opt = make_opt()
  state = jax.eval_shape(opt.init, params)
  step = bench._optimizer_step(opt)  # pylint: disable=protected-access
  lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params)
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return (_kernels(compiled.as_text()), cost["bytes accessed"] / n_params,
          compile_s)


def main():
  jadam.enable_cpu_fusion()
  trees = sys.argv[1:] or bench.SIZES["large"]
  print(f"jax {jax.__version__}, backend {jax.default_backend()}")
  print("| tree | implementation | kernels | B/param | compile s |")
  print("| --- | --- | ---: | ---: | ---: |")
  for tree in trees:
    for row in ROWS:
      kernels, per_param, compile_s = measure(tree, row)
      print(f"| {tree} | {row} | {kernels} | {per_param:.1f} | "
            f"{compile_s:.2f} |", flush=True)


if __name__ == "__main__":
  main()

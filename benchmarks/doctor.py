"""What the numerics doctor and spike skipping cost: step and compile time
against the plain optimizer, side by side, on the CPU bench trees.

Rows, each on the tree path and on a ``FlatView`` of the same tree:

* ``plain``: ``jadam.adam(1e-3)``.
* ``doctor10``: ``jadam.doctor(jadam.adam(1e-3), every=10)``; its timed
  group of 10 steps holds exactly one measuring step, so its median is the
  amortised step.
* ``doctor1``: ``every=1``, every step measures: the measuring step.
* ``spikes``: ``jadam.skip_spikes(jadam.adam(1e-3))``.
* ``telemetry1``: ``jadam.with_telemetry(jadam.adam(1e-3))``, every step.
* ``doctor10_vmap`` (``--vmap``): ``doctor10`` under ``jax.vmap`` over 2
  copies, against ``plain`` under the same vmap (where ``lax.cond`` is a
  select, so both branches run on every step).

Each step is ``tx.update`` and ``optax.apply_updates`` on fixed gradients,
params and state donated. Compile time is ``jit(step).lower().compile()``'s
wall time; step time is the median over ``--repeats`` timed groups of 10
steps, the rows interleaved round robin so that machine noise hits all
alike. On a CPU, XLA's multi-output fusion is on (``jadam.enable_cpu_fusion``,
as in ``benchmarks/bench.py``) unless ``--default-xla-flags``. Prints the
JAX version, the device and the command, one JSON line
per row, then a markdown table of times and ratios to ``plain``:

    python benchmarks/doctor.py
    python benchmarks/doctor.py --quick      # smoke test, no measurement

Only public API is used.
"""

import argparse
import json
import shlex
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jadam

try:
  from benchmarks import bench  # the bench trees
except ImportError:  # run as a script from the repository root
  sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1]))
  from benchmarks import bench

GROUP = 10  # steps per timed group: one measuring step of doctor10

ROWS: dict[str, Callable[[Any], optax.GradientTransformation]] = {
    "plain": lambda view: jadam.adam(1e-3),
    "doctor10": lambda view: jadam.doctor(jadam.adam(1e-3), every=10,
                                          view=view),
    "doctor1": lambda view: jadam.doctor(jadam.adam(1e-3), every=1,
                                         view=view),
    "spikes": lambda view: jadam.skip_spikes(jadam.adam(1e-3)),
    "telemetry1": lambda view: jadam.with_telemetry(jadam.adam(1e-3)),
}


def _tree(shapes: dict, seed: int, scale: float) -> dict:
  rng = np.random.default_rng(seed)
  return {name: jnp.asarray(rng.normal(size=shape).astype(np.float32)
                            * scale) for name, shape in shapes.items()}


class Row:
  """One row set up and compiled: ``run(n)`` takes n donated steps."""

  def __init__(self, name: str, shapes: dict, flat: bool, vmap: int):
    params, grads = _tree(shapes, 0, 0.1), _tree(shapes, 1, 1e-2)
    view = None
    if flat:
      view = jadam.FlatView(params)
      params, grads = view.ravel(params), view.ravel(grads)
    tx = ROWS[name](view)

    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    if vmap:
      stack = lambda tree: jax.tree.map(
          lambda x: jnp.stack([x] * vmap), tree)
      params, grads = stack(params), stack(grads)
      state = jax.vmap(tx.init)(params)
      step = jax.vmap(step)
    else:
      state = tx.init(params)
    jitted = jax.jit(step, donate_argnums=(0, 1))
    start = time.perf_counter()
    self.compiled = jitted.lower(params, state, grads).compile()
    self.compile_s = time.perf_counter() - start
    self.params, self.state, self.grads = params, state, grads
    self.run(GROUP)  # warm up; doctor rows now start a group at step 11

  def run(self, n: int) -> None:
    for _ in range(n):
      self.params, self.state = self.compiled(self.params, self.state,
                                              self.grads)
    jax.block_until_ready(self.params)


def measure(trees: list[str], names: list[str], quick: bool, repeats: int,
            vmap: int) -> list[dict]:
  results = []
  for tree in trees:
    shapes = bench.TREES[tree](quick)
    for flat in (False, True):
      rows = {name: Row(name, shapes, flat, vmap) for name in names}
      times = {name: [] for name in names}
      order = list(names)
      for r in range(repeats):
        for name in order[r % len(order):] + order[:r % len(order)]:
          start = time.perf_counter()
          rows[name].run(GROUP)
          times[name].append((time.perf_counter() - start) / GROUP)
      for name in names:
        result = dict(tree=bench.tree_label(tree, quick),
                      path="flat" if flat else "tree", row=name,
                      vmap=vmap, step_ms=1e3 * statistics.median(
                          times[name]),
                      compile_s=rows[name].compile_s)
        print(json.dumps(result), flush=True)
        results.append(result)
  return results


def table(results: list[dict]) -> str:
  lines = ["| tree | path | row | step (ms) | × plain | compile (s) |"
           " × plain |", "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
  plain = {(r["tree"], r["path"]): r for r in results if r["row"] == "plain"}
  for r in results:
    base = plain[(r["tree"], r["path"])]
    lines.append(
        f"| {r['tree']} | {r['path']} | {r['row']} | {r['step_ms']:.2f} | "
        f"{r['step_ms'] / base['step_ms']:.2f} | {r['compile_s']:.2f} | "
        f"{r['compile_s'] / base['compile_s']:.2f} |")
  return "\n".join(lines)


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--trees", nargs="+", default=bench.SIZES["default"],
                      choices=sorted(bench.TREES))
  parser.add_argument("--rows", nargs="+", default=list(ROWS),
                      choices=list(ROWS))
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--vmap", type=int, default=0,
                      help="vmap each row over this many copies (0: none)")
  parser.add_argument("--default-xla-flags", action="store_true",
                      help="leave XLA's default flags (else on CPU: "
                      "jadam.enable_cpu_fusion(), as benchmarks/bench.py)")
  parser.add_argument("--quick", action="store_true",
                      help="small trees, 2 repeats: a smoke test")
  args = parser.parse_args(argv)
  if not args.default_xla_flags:
    jadam.enable_cpu_fusion()  # before JAX's first computation
  repeats = 2 if args.quick else args.repeats
  print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind}; "
        f"python benchmarks/doctor.py {shlex.join(argv or sys.argv[1:])}")
  results = measure(args.trees, list(args.rows), args.quick, repeats,
                    args.vmap)
  print(table(results))
  return results


if __name__ == "__main__":
  main()

"""Which layout should the tree path compile to? Candidates measured side by
side on one tree (issue: the ordinary pytree path within 1.3x of the flat
path on GPT-2 small and within 3x on 1000 leaves, on a GPU).

The state keeps optax's layout, one array per leaf and moment, in every
candidate; only the compiled step differs:

* ``leaves``: ``jadam.adam`` on the tree, as the package runs it (one
  update per leaf).
* ``packed``: inside the step, every leaf's parameter, gradient and
  moments are concatenated into one buffer each, one update runs on the
  buffers, and the results are sliced back into leaves. It moves each
  array twice more (pack and unpack), 84 bytes per parameter instead of
  28, but launches a handful of kernels instead of one per leaf.
* ``packed_small``: the same for the leaves under ``--pack-below``
  elements (biases, norms, small matrices); larger leaves are updated one
  by one. Launches are what small leaves cost, bandwidth what large ones
  cost.
* ``flat``: ``jadam.adam`` on a ``jadam.FlatView`` buffer, the state a
  flat buffer too: the bound the others are measured against.

XLA:CPU's multi-output fusion is on, as in ``python -m benchmarks.bench``.
For each: median step time (interleaved with the others, params and state
donated), compile time, the kernels of the compiled step, and how far its
parameters end from those of the first layout after the same steps.

  python benchmarks/tree_layouts.py gpt2_small many_1000x64k   # a GPU
  python benchmarks/tree_layouts.py --quick gpt2_small         # smoke test
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jadam
if __package__ in (None, ""):
  # Run as a script: the clone's root is where ``benchmarks`` lives.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))

from benchmarks import bench  # pylint: disable=wrong-import-position

import compiled_cost  # pylint: disable=wrong-import-order


class Layout(bench.JaxRunner):
  """One candidate, compiled on one tree, with its data on the device."""

  def __init__(self, shapes, how: str, pack_below: int):
    if how in ("leaves", "flat"):
      make_step = None  # the benchmark's own step
    else:
      threshold = None if how == "packed" else pack_below
      make_step = lambda opt: _packed_step(opt, shapes, threshold)
    super().__init__(jadam.adam(bench.LEARNING_RATE), shapes,
                     flat=how == "flat", make_step=make_step)
    self.kernels = compiled_cost._kernels(  # pylint: disable=protected-access
        self._step.as_text())

  def params(self, like):
    """The parameters as a tree of ``like``'s structure, on the host."""
    if isinstance(self._params, dict) and set(self._params) == set(like):
      return jax.tree.map(np.asarray, self._params)
    return jax.tree.map(np.asarray, jadam.FlatView(like).unravel(self._params))


def _packed_step(opt, shapes, threshold):
  """The donated step with the leaves of fewer than ``threshold`` elements
  (all of them for None) packed into one buffer around the update."""
  small = [name for name, shape in shapes.items()
           if threshold is None or int(np.prod(shape)) < threshold]
  sizes = [int(np.prod(shapes[name])) for name in small]
  ends = np.cumsum(sizes)

  def pack(tree):
    if not small or not isinstance(tree, dict):  # the step count
      return tree
    out = {name: x for name, x in tree.items() if name not in small}
    out["_packed"] = jnp.concatenate([tree[name].ravel() for name in small])
    return out

  def unpack(tree):
    if not small or not isinstance(tree, dict):
      return tree
    out = {name: x for name, x in tree.items() if name != "_packed"}
    for name, end, size in zip(small, ends, sizes):
      out[name] = tree["_packed"][end - size:end].reshape(shapes[name])
    return out

  def is_leaf_tree(x):
    return isinstance(x, dict) and set(x) == set(shapes)

  def is_packed_tree(x):
    return isinstance(x, dict) and "_packed" in x

  def step(params, state, grads):
    state = jax.tree.map(pack, state, is_leaf=is_leaf_tree)
    updates, state = opt.update(pack(grads), state, pack(params))
    state = jax.tree.map(unpack, state, is_leaf=is_packed_tree)
    return jax.tree.map(lambda p, u: p + u, params, unpack(updates)), state

  return step


HOWS = ("leaves", "packed", "packed_small", "flat")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("trees", nargs="+", choices=sorted(bench.TREES))
  parser.add_argument("--hows", default=",".join(HOWS))
  parser.add_argument("--pack-below", type=int, default=1 << 20,
                      help="packed_small packs the leaves of fewer elements "
                      "(default 2^20)")
  parser.add_argument("--steps", type=int, default=15)
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args(argv)
  hows = args.hows.split(",")
  jadam.enable_cpu_fusion()  # as the benchmark runs; nothing on a GPU
  print(bench.describe_machine(bench._machine()))  # pylint: disable=protected-access
  print("| tree | layout | step ms | × flat | compile s | kernels |"
        " max abs Δθ vs leaves |")
  print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
  for tree in args.trees:
    shapes = bench.TREES[tree](args.quick)
    runners = {}
    for how in hows:
      print(f"{tree}: compiling {how}", file=sys.stderr, flush=True)
      runners[how] = Layout(shapes, how, args.pack_below)
    medians = bench._interleave(runners, args.steps, 3)  # pylint: disable=protected-access
    # Every layout took the same steps from the same start: the parameters
    # must agree (to rounding: the layouts may contract differently).
    like = bench._tree_data(shapes)[0]  # pylint: disable=protected-access
    reference = runners[hows[0]].params(like)
    for how, runner in runners.items():
      ratio = (f"{medians[how] / medians['flat']:.2f}" if "flat" in medians
               else "")
      differs = max(float(np.max(np.abs(a - b))) for a, b in zip(
          jax.tree.leaves(runner.params(like)), jax.tree.leaves(reference)))
      print(f"| {tree} | {how} | {1e3 * medians[how]:.3f} | {ratio} | "
            f"{runner.compile_s:.2f} | {runner.kernels} | {differs:.1e} |",
            flush=True)
    del runners


if __name__ == "__main__":
  main()

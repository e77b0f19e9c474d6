"""What parameter groups cost: step time and compile time of one optimizer
with many groups, on the flat path and the tree path, against optax.

The tree has ``--leaves`` float32 leaves named ``layer<i>/<kind>`` with
shapes cycling through a few matrix, bias and scale shapes, in ``--groups``
groups: group k takes the leaves with i % groups == k and has its own
learning rate, weight decay and ε (β1 and β2 stay the defaults, so a
``FlatView`` keeps one buffer). Rows:

* ``flat``: a ``FlatView`` without groups, ``jadam.adamw`` on its buffer.
* ``flat_groups``: a ``FlatView`` with the groups (one contiguous segment
  per group), ``jadam.adamw(..., groups=view.groups)``: one pass, each
  position's values chosen by comparing an iota with the segments' starts.
* ``flat_slices``: the alternative design, the grouped view's buffer cut
  into one static slice per group, the slices stepped as a tree of one
  leaf per group, and the updates concatenated back into one buffer.
* ``tree``: ``jadam.adamw`` on the tree, without groups.
* ``tree_groups``: ``jadam.adamw`` on the tree with the groups.
* ``optax_partition``: ``optax.partition`` of one ``optax.adamw`` per
  group, labelled from the same assignment. Its state holds, per group, a
  copy of the whole tree with ``optax.MaskedNode`` where the group has no
  leaf, so its step time includes flattening and unflattening that state
  on the host at every call, a cost that grows with groups times leaves.

Each row's step is ``tx.update`` plus ``params + updates`` with fixed
gradients, so only the optimizer is timed; params and state are donated.
Compile time is the wall time of ``jax.jit(step).lower(...).compile()``;
step time is the median over ``--repeats`` timed groups of ``--steps``
steps, the rows' groups interleaved (round robin, starting one row later
each round), so that machine noise hits all rows alike. Before timing, the
rows' first updates are checked against each other: both flat rows with
groups against the tree path with groups to a few float32 ulp, the tree
path with groups against optax bitwise.

Prints the JAX version, the device and the command, one JSON line per row
(``leaves`` is the number of arrays the optimizer steps, ``groups`` the
number of groups it holds), then a markdown table and the ratios:

    python benchmarks/groups.py
    python benchmarks/groups.py --quick          # smoke test, no measurement

Only public API is used (``jadam``, ``optax``, ``jax``).
"""

import argparse
import json
import re
import shlex
import statistics
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jadam

# Leaf kinds and shapes, cycled through by leaf index.
KINDS = (("attn", (64, 64)), ("mlp", (64, 128)), ("bias", (128,)),
         ("proj", (32, 256)), ("scale", (256,)))
ROWS = ("flat", "flat_groups", "flat_slices", "tree", "tree_groups",
        "optax_partition")
# Each row's step time is compared with its ungrouped baseline.
BASELINE = {"flat": "flat", "flat_groups": "flat", "flat_slices": "flat",
            "tree": "tree", "tree_groups": "tree", "optax_partition": "tree"}
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.1
# The flat path with groups selects each position's ε, λ and α where the
# tree path has scalars: XLA may contract the arithmetic differently.
MAX_ULP = 8
QUICK = dict(leaves=100, groups=10, scale=0.25, steps=2, repeats=3)
SMOKE_LINE = ("Quick smoke test (--quick): a tiny tree, not a measurement; "
              "run without --quick for the numbers.")


def make_tree(leaves: int, scale: float) -> dict:
  """``{"layer<i>": {kind: array}}``, float32, the leading dimension of each
  shape multiplied by ``scale``; parameters random, fixed by the seed."""
  rng = np.random.default_rng(0)
  width = max(3, len(str(leaves - 1)))
  tree = {}
  for i in range(leaves):
    kind, shape = KINDS[i % len(KINDS)]
    shape = (max(1, round(shape[0] * scale)),) + shape[1:]
    tree[f"layer{i:0{width}d}"] = {
        kind: (0.02 * rng.standard_normal(shape)).astype(np.float32)}
  return tree


def make_groups(params: dict, count: int) -> list:
  """Group k (of ``count``) takes the leaves of index i with i % count == k,
  as an alternation of their escaped paths, with its own values."""
  paths = jax.tree.leaves(jadam.param_paths(params))
  groups = []
  for k in range(count):
    match = "|".join(re.escape(p) for p in paths[k::count])
    groups.append(jadam.Group(
        f"g{k:02d}", match=match,
        learning_rate=LEARNING_RATE * 2.0 ** -(k % 5),
        weight_decay=WEIGHT_DECAY * (k % 4) / 3,
        eps=10.0 ** -(6 + k % 4)))
  return groups


def group_labels(params: dict, groups: list) -> dict:
  """Each leaf's group name, by the groups' own matching (the labels of
  ``optax.partition``)."""
  def label(path):
    return next(g.name for g in groups if re.fullmatch(g.match, path))
  return jax.tree.map(label, jadam.param_paths(params))


def optax_tx(group: jadam.Group) -> optax.GradientTransformation:
  return optax.adamw(group.learning_rate, eps=group.eps,
                     weight_decay=group.weight_decay)


class Case(NamedTuple):
  """One row: how to start its state and take its update, on its params
  (a tree or a FlatView's buffers) with its fixed gradients."""

  name: str
  init: Callable[[Any], Any]
  update: Callable[[Any, Any, Any], tuple]
  params: Any
  grads: Any
  leaves: int
  groups: int


def sliced(view: jadam.FlatView, params: dict, groups: list) -> tuple:
  """The ``flat_slices`` design on the grouped view's buffers, stepping one
  static slice per group with the tree path: ``(init, update, view, leaves,
  groups)`` as ``make_cases`` builds a row."""
  segments = view.groups.segments(view.ravel(params))
  if len(view.keys) != 1:
    raise ValueError(f"expected one buffer, the view has {view.keys}.")
  key = view.keys[0]
  names = [groups[s.group].name for s in segments[0]]
  sizes = [s.stop - s.start for s in segments[0]]
  tx = jadam.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY, groups=[
      jadam.Group(g.name, match=re.escape(g.name),
                  learning_rate=g.learning_rate,
                  weight_decay=g.weight_decay, eps=g.eps) for g in groups])

  def cut(flat):
    return dict(zip(names, jax.lax.split(flat[key], sizes)))

  def init(flat):
    return tx.init(cut(flat))

  def update(grads, state, flat):
    updates, state = tx.update(cut(grads), state, cut(flat))
    return {key: jnp.concatenate([updates[n] for n in names])}, state

  return init, update, view, len(names), len(groups)


def make_cases(rows: list, leaves: int, groups: int, scale: float) -> tuple:
  """``(cases, parameters, grouped view)``: the selected rows' cases, the
  tree's parameter count, and the ``FlatView`` with the groups (the order
  the checks compare buffers in)."""
  tree = make_tree(leaves, scale)
  grads_tree = jax.tree.map(lambda p: 0.01 * np.sin(p), tree)
  group_list = make_groups(tree, groups)
  view = jadam.FlatView(tree)
  gview = jadam.FlatView(tree, groups=group_list)
  on_tree = lambda tx: (tx.init, tx.update)
  grouped = jadam.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY,
                        groups=group_list)
  partition = getattr(optax, "partition", None) or optax.multi_transform
  builders = {
      "flat": lambda: on_tree(jadam.adamw(
          LEARNING_RATE, weight_decay=WEIGHT_DECAY)) + (view, 1, 0),
      "flat_groups": lambda: on_tree(jadam.adamw(
          LEARNING_RATE, weight_decay=WEIGHT_DECAY,
          groups=gview.groups)) + (gview, 1, groups),
      "flat_slices": lambda: sliced(gview, tree, group_list),
      "tree": lambda: on_tree(jadam.adamw(
          LEARNING_RATE, weight_decay=WEIGHT_DECAY)) + (None, leaves, 0),
      "tree_groups": lambda: on_tree(grouped) + (None, leaves, groups),
      "optax_partition": lambda: on_tree(partition(
          {g.name: optax_tx(g) for g in group_list},
          group_labels(tree, group_list))) + (None, leaves, groups),
  }
  cases = []
  for name in rows:
    init, update, layout, n_leaves, n_groups = builders[name]()
    if layout is None:
      as_input = lambda t: jax.tree.map(jnp.asarray, t)
    else:
      as_input = layout.ravel
    cases.append(Case(name, init, update, as_input(tree), as_input(grads_tree),
                      n_leaves, n_groups))
  params = sum(int(np.size(p)) for p in jax.tree.leaves(tree))
  return cases, params, gview


def first_update(case: Case) -> Any:
  """The case's update on its first step, on the host."""
  update = jax.jit(lambda g, s, p: case.update(g, s, p)[0])
  out = update(case.grads, case.init(case.params), case.params)
  return jax.tree.map(np.asarray, out)


def ulp_distance(a: np.ndarray, b: np.ndarray) -> int:
  """Largest distance in float32 ulp (representable values) between two
  float32 arrays."""
  def ordered(x):
    bits = np.asarray(x, np.float32).view(np.int32).astype(np.int64)
    return np.where(bits < 0, -(bits & 0x7FFFFFFF), bits)
  return int(np.max(np.abs(ordered(a) - ordered(b)), initial=0))


def check(cases: list, gview: jadam.FlatView) -> list:
  """Assert that the rows that should agree do, on their first update;
  returns what was checked, as lines."""
  by_name = {c.name: c for c in cases}
  updates = {n: first_update(by_name[n]) for n in
             ("flat_groups", "flat_slices", "tree_groups", "optax_partition")
             if n in by_name}
  lines = []
  if "tree_groups" in updates:
    tree = {k: np.asarray(v) for k, v in
            gview.ravel(updates["tree_groups"]).items()}
    for name in ("flat_groups", "flat_slices"):
      if name in updates:
        ulp = max(ulp_distance(updates[name][k], tree[k]) for k in tree)
        assert ulp <= MAX_ULP, (
            f"{name}'s first update is {ulp} ulp from tree_groups' "
            f"(at most {MAX_ULP} allowed).")
        lines.append(f"{name} = tree_groups (raveled) to {ulp} ulp")
    if "optax_partition" in updates:
      a, b = updates["tree_groups"], updates["optax_partition"]
      assert jax.tree.structure(a) == jax.tree.structure(b)
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), (
            "tree_groups' first update is not bitwise optax_partition's.")
      lines.append("tree_groups = optax_partition bitwise")
  return lines


def compile_case(case: Case) -> tuple:
  """``(compiled donated step, its state, compile seconds)``."""
  def step(params, state, grads):
    updates, state = case.update(grads, state, params)
    return jax.tree.map(jnp.add, params, updates), state

  state = case.init(case.params)
  start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
      case.params, state, case.grads).compile()
  return compiled, state, time.perf_counter() - start


def measure(cases: list, steps: int, repeats: int) -> list:
  """Per case, ``{"compile_s", "step_ms"}``: compiled one after another,
  then timed in interleaved groups of ``steps`` steps."""
  live = []
  for case in cases:
    compiled, state, seconds = compile_case(case)
    print(f"# compiled {case.name} in {seconds:.2f} s", file=sys.stderr,
          flush=True)
    params = jax.tree.map(jnp.copy, case.params)
    params, state = compiled(params, state, case.grads)  # warm up
    jax.block_until_ready(params)
    live.append({"compiled": compiled, "params": params, "state": state,
                 "compile_s": seconds, "times": []})
  for r in range(repeats):
    for i in range(len(cases)):
      j = (i + r) % len(cases)
      row, grads = live[j], cases[j].grads
      params, state = row["params"], row["state"]
      start = time.perf_counter()
      for _ in range(steps):
        params, state = row["compiled"](params, state, grads)
      jax.block_until_ready(params)
      row["times"].append((time.perf_counter() - start) / steps)
      row["params"], row["state"] = params, state
  return [{"compile_s": round(row["compile_s"], 3),
           "step_ms": round(1e3 * statistics.median(row["times"]), 3)}
          for row in live]


# The ratios printed under the table: (numerator, denominator, measures).
RATIOS = (("flat_groups", "flat", ("step", "compile")),
          ("flat_groups", "optax_partition", ("step",)),
          ("optax_partition", "flat_groups", ("compile",)),
          ("tree_groups", "tree", ("step", "compile")),
          ("flat_slices", "flat_groups", ("step", "compile")))
FIELDS = {"step": "step_ms", "compile": "compile_s"}


def ratios(results: dict) -> list:
  """``{"rows": "a/b", "step": x, "compile": y}`` for each of ``RATIOS``
  whose two rows ran (only the measures it names)."""
  out = []
  for a, b, measures in RATIOS:
    if a in results and b in results:
      out.append({"rows": f"{a}/{b}", **{
          m: round(results[a][FIELDS[m]] / results[b][FIELDS[m]], 3)
          for m in measures}})
  return out


def table(results: dict) -> list:
  """The markdown table, one line per row, each row's step time also as a
  ratio to its ungrouped baseline."""
  lines = ["| row | median step (ms) | compile (s) | step × baseline |",
           "| --- | ---: | ---: | --- |"]
  for name, row in results.items():
    base = BASELINE[name]
    versus = (f"{row['step_ms'] / results[base]['step_ms']:.2f} (vs {base})"
              if base in results else "-")
    lines.append(f"| {name} | {row['step_ms']:.3f} | {row['compile_s']:.2f} "
                 f"| {versus} |")
  return lines


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=10,
                      help="steps per timed group")
  parser.add_argument("--repeats", type=int, default=15,
                      help="timed groups per row (the median is reported)")
  parser.add_argument("--scale", type=float, default=1.0,
                      help="factor on each leaf's leading dimension")
  parser.add_argument("--leaves", type=int, default=1000)
  parser.add_argument("--groups", type=int, default=50)
  parser.add_argument("--rows", default=",".join(ROWS),
                      help=f"comma-separated, of {', '.join(ROWS)}")
  parser.add_argument("--json", metavar="PATH",
                      help="also write the rows and ratios as JSON")
  parser.add_argument("--quick", action="store_true",
                      help="smoke test: a tiny tree, few steps")
  args = parser.parse_args(argv)
  if args.quick:
    for name, value in QUICK.items():
      setattr(args, name, value)
  rows = [r.strip() for r in args.rows.split(",") if r.strip()]
  unknown = sorted(set(rows) - set(ROWS))
  if unknown or not rows:
    parser.error(f"unknown rows {unknown}; the rows are {', '.join(ROWS)}.")
  if not 1 <= args.groups <= args.leaves:
    parser.error("--groups must be between 1 and --leaves.")
  if args.quick:
    print(SMOKE_LINE)
  device = jax.devices()[0]
  print(f"JAX {jax.__version__}, optax {optax.__version__}, platform "
        f"{device.platform}, device kind {device.device_kind}")
  command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
  print(f"command: {command}")
  cases, params, gview = make_cases(rows, args.leaves, args.groups,
                                    args.scale)
  print(f"tree: {args.leaves} leaves, {params:,} parameters, "
        f"{args.groups} groups; {args.steps} steps x {args.repeats} "
        "interleaved repeats per row", flush=True)
  for line in check(cases, gview):
    print(f"check: {line}", flush=True)
  measured = measure(cases, args.steps, args.repeats)
  results = {}
  for case, numbers in zip(cases, measured):
    row = {"row": case.name, **numbers, "leaves": case.leaves,
           "groups": case.groups, "params": params}
    results[case.name] = row
    print(json.dumps(row), flush=True)
  print()
  print("\n".join(table(results)))
  print()
  found = ratios(results)
  for entry in found:
    parts = [f"{m} {entry[m]:.2f}x" for m in ("step", "compile") if m in entry]
    print(f"{entry['rows']}: {', '.join(parts)}")
  if args.json:
    doc = {"quick": args.quick, "jax": jax.__version__,
           "optax": optax.__version__, "platform": device.platform,
           "device_kind": device.device_kind, "command": command,
           "steps": args.steps, "repeats": args.repeats,
           "tree_leaves": args.leaves, "groups": args.groups,
           "params": params, "rows": list(results.values()),
           "ratios": found}
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(doc, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())

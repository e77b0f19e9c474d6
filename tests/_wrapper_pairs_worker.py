"""Worker of tests/test_wrapper_pairs.py: every ordered pair of wrappers (and
the stacks the docs show) around ``jadam.adam`` with bfloat16 and int8
moments, on a simulated 4-device mesh.

For each stack it checks that ``init`` has the memory kinds and shardings
``jadam.sharding.abstract_state`` promises, that two jitted steps (the second with a
NaN gradient) keep them, and that a state saved with orbax and restored onto
``abstract_state`` steps on bitwise like the state that never left memory.
Prints one JSON object: stack name -> "ok" or the error.

Usage: python _wrapper_pairs_worker.py {Auto|Explicit|none}
"""

import json
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import optax  # pylint: disable=g-import-not-at-top,wrong-import-position
import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top,wrong-import-position

import jadam  # pylint: disable=g-import-not-at-top,wrong-import-position
from conftest import offload_supported  # pylint: disable=g-import-not-at-top,wrong-import-position

MESH_KIND = sys.argv[1]
if MESH_KIND == "none":
  MESH = None
else:
  MESH = jax.make_mesh((4,), ("data",), axis_types=(
      getattr(jax.sharding.AxisType, MESH_KIND),))


WRAPPERS = {
    "skip_nonfinite": jadam.skip_nonfinite,
    "with_telemetry": jadam.with_telemetry,
    "offload": jadam.sharding.offload,
    "zero1": lambda tx: jadam.sharding.zero1(tx, MESH),
    "MultiSteps": lambda tx: optax.MultiSteps(tx, every_k_schedule=2),
    "chain": lambda tx: optax.chain(optax.clip_by_global_norm(1.0), tx),
    "inject_hyperparams": None,  # wraps the factory: see build()
}
OPTAX_OUTSIDE = ("MultiSteps", "chain", "inject_hyperparams")


def build(stack):
  """``stack`` (outermost first) around adam with bf16 μ and int8 ν."""
  factory = lambda lr: jadam.adam(lr, mu_dtype=jnp.bfloat16, nu_dtype="int8")
  for name in reversed(stack):
    if name == "inject_hyperparams":
      factory = optax.inject_hyperparams(factory)
    else:
      factory = (lambda wrap, inner: lambda lr: wrap(inner(lr)))(
          WRAPPERS[name], factory)
  return factory(1e-2)


def placements_equal(expected, actual, what):
  paths = jax.tree_util.tree_flatten_with_path(expected)[0]
  leaves = jax.tree.leaves(actual)
  assert len(paths) == len(leaves), (what, len(paths), len(leaves))
  for (path, want), got in zip(paths, leaves):
    same = (want.sharding.memory_kind == got.sharding.memory_kind
            and want.sharding.is_equivalent_to(got.sharding, got.ndim))
    assert same, (what, jax.tree_util.keystr(path), str(want.sharding),
                  str(got.sharding))


def check(stack, params):
  tx = build(stack)
  step = jax.jit(lambda s, g: tx.update(g, s, params)[1])
  grads = [jax.tree.map(lambda p, v=v: jnp.full_like(p, v), params)
           for v in (1.0, np.nan, 0.5, 2.0)]
  state = tx.init(params)
  if stack[0] in OPTAX_OUTSIDE:
    # optax's own wrappers make their counters uncommitted; the documented
    # remedy (docs/distributed.md) places them where a step returns them.
    state = jadam.sharding.place_scalars(state, params)
  abstract = jadam.sharding.abstract_state(tx, params)
  placements_equal(abstract, state, "init")
  initial = state
  for g in grads[:2]:
    state = step(state, g)
    placements_equal(initial, state, "step")
  compiled = step._cache_size()  # pylint: disable=protected-access
  with tempfile.TemporaryDirectory() as tmp:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(tmp, "c"), state)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(os.path.join(tmp, "c"), abstract)
  for g in grads[2:]:
    state, restored = step(state, g), step(restored, g)
  placements_equal(initial, restored, "restored")
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), "not bitwise"
  # One compilation for the whole run on a mesh, where the restored state
  # has exactly the shardings a step returns. Without a mesh a fresh state
  # is uncommitted (as optax's) unless something in it lives in host memory,
  # and orbax restores committed arrays: one more compilation after restore.
  recompiled = step._cache_size()  # pylint: disable=protected-access
  assert compiled == 1, compiled
  assert recompiled == 1 or (MESH is None and recompiled == 2), recompiled


def main():
  names = [n for n in WRAPPERS if n != "zero1" or MESH is not None]
  if not offload_supported():
    names.remove("offload")
  stacks = [(a, b) for a in names for b in names if a != b]
  # The stacks the docs show with more than one wrapper.
  stacks += [("with_telemetry", "skip_nonfinite"),
             ("with_telemetry", "skip_nonfinite", "offload"),
             ("offload", "MultiSteps", "skip_nonfinite")]
  if MESH is not None:
    stacks += [("with_telemetry", "skip_nonfinite", "zero1", "offload")]
  stacks = [s for s in dict.fromkeys(stacks) if set(s) <= set(names)]
  params = {"w": jnp.ones((8, 512)), "b": jnp.ones(7)}
  if MESH is not None:
    replicated = jax.sharding.NamedSharding(MESH, jax.sharding.PartitionSpec())
    params = jax.device_put(params, replicated)
  out = {}
  for stack in stacks:
    try:
      check(stack, params)
      out["(".join(stack)] = "ok"
    except Exception as e:  # pylint: disable=broad-except
      out["(".join(stack)] = f"{type(e).__name__}: {str(e)[:400]}"
  print(json.dumps(out))


if __name__ == "__main__":
  main()

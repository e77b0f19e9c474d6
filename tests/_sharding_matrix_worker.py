"""The sharding matrix on one kind of mesh, run in a subprocess.

Usage: python tests/_sharding_matrix_worker.py AXIS_TYPE LAYOUT
(AXIS_TYPE: Auto or Explicit; LAYOUT: data, model or mixed), on 8 simulated
CPU devices. Prints one JSON object: per cell (optimizer, storage, wrapper)
the measurements ``tests/test_sharding_matrix.py`` asserts on.

The cells are a covering design over (optimizer × storage × wrapper): every
optimizer meets every storage, every optimizer meets every wrapper and every
storage meets every wrapper, in 12 × 7 = 84 cells (the storage of cell
(optimizer i, wrapper j) is storage (i + j) mod 4). Each cell is checked
after jit init, eager init, ``abstract_state`` and 4 jitted steps from each
of them, so every init mode meets every optimizer, storage and wrapper too.
The full product would be 336 cells per mesh, 4x the CI time, for pairs that
do not interact (the wrappers never look at the storage format).
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jadam
from jadam.sharding import _zero1

STEPS = 4
LR = 1e-2

# Parameters: a matrix whose last axis is whole int8 blocks (256), a vector,
# and a leaf of 6 elements that no mesh axis divides (it stays whole).
SHAPES = {"w": (16, 256), "b": (256,), "odd": (6,)}
PARAM_SPECS = {
    "data": {"w": P(), "b": P(), "odd": P()},           # data parallel
    "model": {"w": P(None, "model"), "b": P("model"), "odd": P()},
    "mixed": {"w": P("data", "model"), "b": P("model"), "odd": P()},
}
MESH_SHAPES = {"data": ((8,), ("data",)), "model": ((8,), ("model",)),
               "mixed": ((4, 2), ("data", "model"))}

OPTIMIZERS = ("adam", "adamw", "nadam", "nadamw", "amsgrad", "adamax",
              "adamaxw", "radam", "adopt", "ademamix", "schedule_free_adamw",
              "cautious_adam")
STORAGES = {
    "float32": {},
    "bfloat16": {"mu_dtype": jnp.bfloat16, "nu_dtype": jnp.bfloat16},
    "int8": {"mu_dtype": "int8", "nu_dtype": "int8"},
    "mixed": {"mu_dtype": jnp.bfloat16, "nu_dtype": "int8"},
}
# Wrappers whose own state optax's code makes.
OPTAX_WRAPPERS = ("multi_steps", "inject_hyperparams")
WRAPPERS = ("none", "skip_nonfinite", "with_telemetry", "zero1",
            "chain_clip", "multi_steps", "inject_hyperparams")


def cells():
  storages = list(STORAGES)
  for i, opt in enumerate(OPTIMIZERS):
    for j, wrapper in enumerate(WRAPPERS):
      yield opt, storages[(i + j) % len(storages)], wrapper


def factory(opt: str, storage: str):
  """``make(learning_rate) -> GradientTransformation`` for a cell."""
  kwargs = dict(STORAGES[storage])
  if opt == "schedule_free_adamw":
    # It keeps no first moment; its storage option is v's.
    kwargs.pop("mu_dtype", None)
    fn = jadam.contrib.schedule_free_adamw
  elif opt == "cautious_adam":
    fn, kwargs["cautious"] = jadam.adam, True
  else:
    fn = getattr(jadam, opt)

  def make(learning_rate):
    return fn(learning_rate, **kwargs)
  return make


def wrap(wrapper: str, make, mesh):
  if wrapper == "inject_hyperparams":
    return optax.inject_hyperparams(make)(learning_rate=LR)
  tx = make(LR)
  if wrapper == "none":
    return tx
  if wrapper == "skip_nonfinite":
    return jadam.skip_nonfinite(tx)
  if wrapper == "with_telemetry":
    return jadam.with_telemetry(tx)
  if wrapper == "zero1":
    return jadam.sharding.zero1(tx, mesh, mesh.axis_names[0])
  if wrapper == "chain_clip":
    return optax.chain(optax.clip_by_global_norm(1.0), tx)
  if wrapper == "multi_steps":
    return optax.MultiSteps(tx, every_k_schedule=2)
  raise ValueError(wrapper)


def make_params():
  keys = jax.random.split(jax.random.PRNGKey(0), len(SHAPES))
  return {name: 0.5 * jax.random.normal(k, shape)
          for k, (name, shape) in zip(keys, sorted(SHAPES.items()))}


TARGETS = {name: jnp.cos(jnp.arange(np.prod(shape), dtype=jnp.float32)
                         ).reshape(shape) for name, shape in SHAPES.items()}


def loss_fn(params):
  # Elementwise, so gradients are split exactly like their parameters.
  return sum(jnp.sum(jnp.tanh(params[k]) * TARGETS[k] + 0.1 * params[k] ** 2)
             for k in params)


def train_step(tx):
  """The (unjitted) training step of a cell."""
  def step(params, state):
    grads = jax.grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def jitted(step, out_shardings=None):
  if out_shardings is None:
    return jax.jit(step)
  return jax.jit(step, out_shardings=out_shardings)


def param_of(path) -> str | None:
  """The parameter a state leaf belongs to (its dict key), if any."""
  for entry in path:
    key = getattr(entry, "key", None)
    if key in SHAPES:
      return key
  return None


def spec_axes(spec) -> set:
  out = set()
  for entry in spec:
    if entry is None:
      continue
    out.update(entry if isinstance(entry, tuple) else (entry,))
  return out


def normalized(spec, ndim) -> tuple:
  entries = list(spec) + [None] * (ndim - len(spec))
  return tuple(tuple(e) if isinstance(e, list) else e for e in entries)


def expected_spec(param, mesh, zero1_axis):
  """Where a state array of ``param``'s shape belongs: the parameter's spec,
  with the ZeRO-1 axis added (``add_axis``) under ZeRO-1."""
  if zero1_axis is None:
    return param.sharding.spec
  return _zero1.add_axis(param.sharding.spec, param.shape, mesh,
                            zero1_axis)


def placement(state, params, mesh, zero1_axis) -> list[str]:
  """Where the state breaks the documented placement (empty: none).

  * A state array of its parameter's shape has the parameter's sharding, or
    under ZeRO-1 the parameter's with the data axis added to the largest
    free dimension it divides (``jadam.sharding._zero1.add_axis``).
  * Any other state array of a parameter (int8 block scales) is split over
    no mesh axis the parameter's state is not split over.
  * Arrays of no parameter (counts, telemetry) are replicated, scalars
    included: committed to every device of the mesh, where a jitted step
    returns them (an uncommitted scalar makes the second step compile
    again).
  """
  problems = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if not hasattr(leaf, "sharding") or not hasattr(leaf, "ndim"):
      continue
    where = jax.tree_util.keystr(path)
    sharding = leaf.sharding
    if leaf.ndim == 0:
      if not leaf.committed or len(sharding.device_set) != mesh.devices.size:
        problems.append(f"{where}: scalar on {len(sharding.device_set)} "
                        f"device(s), committed={leaf.committed}")
      continue
    if not isinstance(sharding, NamedSharding):
      if len(sharding.device_set) != mesh.devices.size:
        problems.append(f"{where}: on {len(sharding.device_set)} devices")
      continue
    name = param_of(path)
    if name is None:
      if spec_axes(sharding.spec) and leaf.ndim:
        problems.append(f"{where}: split {sharding.spec}")
      continue
    param = params[name]
    expected = expected_spec(param, mesh, zero1_axis)
    if tuple(leaf.shape) == tuple(param.shape):
      if normalized(sharding.spec, leaf.ndim) != normalized(expected,
                                                            leaf.ndim):
        problems.append(f"{where}: {sharding.spec}, expected {expected}")
    elif not spec_axes(sharding.spec) <= spec_axes(expected):
      problems.append(f"{where}: {sharding.spec} splits over more axes "
                      f"than {expected}")
  return problems


def expected_bytes_per_device(state, params, mesh, zero1_axis) -> int:
  """What each device should hold of ``state`` if it is placed as
  documented (:func:`placement`): a state array of its parameter's shape is
  cut into as many pieces as the expected spec says, block scales as their
  own spec says (checked by :func:`placement`), anything else is whole."""
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if not hasattr(leaf, "nbytes"):
      continue
    name = param_of(path)
    spec = P()
    if name is not None:
      param = params[name]
      spec = expected_spec(param, mesh, zero1_axis)
      if tuple(leaf.shape) != tuple(param.shape):
        spec = leaf.sharding.spec
    pieces = int(np.prod([mesh.shape[a] for a in spec_axes(spec)]))
    total += leaf.nbytes // pieces
  return total


def max_error(a, b) -> float:
  worst = 0.0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    scale = max(float(np.max(np.abs(y))), 1e-30)
    worst = max(worst, float(np.max(np.abs(x - y))) / scale)
  return worst


def float_leaves(state):
  return [x for x in jax.tree.leaves(state)
          if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]


def run_cell(opt, storage, wrapper, mesh, params, sharded):
  zero1_axis = mesh.axis_names[0] if wrapper == "zero1" else None
  make = factory(opt, storage)
  tx = wrap(wrapper, make, mesh)
  auto = mesh.axis_types[0] == AxisType.Auto
  out_shardings = None
  inits = {}
  if zero1_axis is not None:
    zero1_shardings = jadam.sharding.zero1_shardings(
        wrap("none", make, mesh), sharded, zero1_axis)
    if auto:
      # Documented: on Auto axes the compiler places a ZeRO-1 step's
      # outputs, so the step is told where parameters and state go, as
      # usual with Auto meshes.
      out_shardings = (jax.tree.map(lambda a: a.sharding, sharded),
                       zero1_shardings)
    # The documented way to fix every dimension of a traced ZeRO-1 init.
    inits["jit_out_shardings"] = jax.jit(
        tx.init, out_shardings=zero1_shardings)(sharded)
  train_fn = train_step(tx)
  result = {}
  inits["jit"] = jax.jit(tx.init)(sharded)
  inits["eager"] = tx.init(sharded)
  if wrapper in OPTAX_WRAPPERS:
    # Their scalars are made by optax's init, uncommitted; the documented
    # recipe places them (docs/distributed.md).
    inits["eager"] = jadam.sharding.place_scalars(inits["eager"], sharded)
  abstract = jadam.sharding.abstract_state(tx, jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
      sharded))
  # The abstract state as a restore target: zeros placed as it says.
  inits["abstract"] = jax.tree.map(
      lambda s, x: jax.device_put(jnp.asarray(x, s.dtype), s.sharding),
      abstract, inits["jit"])
  problems = {}
  finals = {}
  recompiled = {}
  mode_errors = {}
  for mode, state in inits.items():
    found = placement(state, sharded, mesh, zero1_axis)
    # A jit of its own per init mode, so that a signature another mode
    # compiled first cannot hide a recompilation: only this jit's cache
    # entries are counted (the programs themselves come from JAX's caches,
    # keyed by the one Python step function).
    step = jitted(train_fn, out_shardings)
    try:
      p, s = step(sharded, state)
    except Exception as e:  # pylint: disable=broad-except
      # Recorded per init mode, so that the other modes are still checked.
      mode_errors[mode] = f"{type(e).__name__}: {str(e)[:300]}"
      if found:
        problems[mode] = found
      continue
    # Compilations after the first step: the state must come back placed
    # and typed as it went in (see test_sharding_matrix.recompiles_known).
    after_first = step._cache_size()  # pylint: disable=protected-access
    for _ in range(STEPS - 1):
      p, s = step(p, s)
    recompiled[mode] = step._cache_size() - after_first  # pylint: disable=protected-access
    found += [f"after {STEPS} steps: {x}"
              for x in placement(s, sharded, mesh, zero1_axis)]
    found += [f"param {k}: {p[k].sharding.spec}" for k in p
              if normalized(p[k].sharding.spec, p[k].ndim)
              != normalized(sharded[k].sharding.spec, p[k].ndim)]
    if found:
      problems[mode] = found
    finals[mode] = (p, s)
  result["placement_problems"] = problems
  result["mode_errors"] = mode_errors
  result["recompiled_after_first_step"] = recompiled
  # Values: the same optimizer on one device, from the same parameters.
  single = jax.device_put(params, jax.devices()[0])
  ref_tx = wrap(wrapper if wrapper != "zero1" else "none", make, mesh)
  ref_step = jitted(train_step(ref_tx))
  rp, rs = single, ref_tx.init(single)
  for _ in range(STEPS):
    rp, rs = ref_step(rp, rs)
  # Eager init is exact on every mesh (a traced ZeRO-1 init on Auto axes
  # is not, see test_sharding_matrix.known).
  p, s = finals["eager"]
  result["param_error"] = max_error(p, rp)
  result["state_error"] = max_error(float_leaves(s), float_leaves(rs))
  result["init_spread"] = max(max_error(finals[m][0], p) for m in finals)
  result["moved"] = max_error(p, single)
  result["state_bytes_per_device"] = max(
      jadam.sharding.bytes_per_device(s).values())
  result["expected_bytes_per_device"] = expected_bytes_per_device(
      s, sharded, mesh, zero1_axis)
  return result


def main():
  axis_type, layout = sys.argv[1], sys.argv[2]
  shape, names = MESH_SHAPES[layout]
  mesh = jax.make_mesh(shape, names,
                       axis_types=(getattr(AxisType, axis_type),) * len(names))
  params = make_params()
  sharded = {k: jax.device_put(v, NamedSharding(mesh, PARAM_SPECS[layout][k]))
             for k, v in params.items()}
  # Spelled as a jitted step returns them (P() comes back as P(None,) on
  # Explicit axes, and the reverse on Auto): JAX compiles again for another
  # spelling of the same placement, with any optimizer, which would hide the
  # recompilations this matrix looks for.
  sharded = jax.jit(lambda p: jax.tree.map(lambda x: x + 0, p))(sharded)
  out = {"jax": jax.__version__, "devices": jax.device_count(), "cells": {}}
  start = time.perf_counter()
  only = os.environ.get("JADAM_MATRIX_ONLY")
  for opt, storage, wrapper in cells():
    key = f"{opt}/{storage}/{wrapper}"
    if only and only not in key:
      continue
    t0 = time.perf_counter()
    try:
      cell = run_cell(opt, storage, wrapper, mesh, params, sharded)
    except Exception as e:  # pylint: disable=broad-except
      frames = [f for f in traceback.extract_tb(e.__traceback__)
                if "site-packages" not in f.filename][-3:]
      cell = {"error": f"{type(e).__name__}: {str(e)[:400]} at " + " <- ".join(
          f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}"
          for f in reversed(frames))}
    cell["seconds"] = round(time.perf_counter() - t0, 2)
    out["cells"][key] = cell
  out["seconds"] = round(time.perf_counter() - start, 1)
  print(json.dumps(out))


if __name__ == "__main__":
  main()

"""Sharding checks on 8 simulated CPU devices, run in a subprocess.

The device count must be fixed before JAX is imported, so
``tests/test_sharding.py`` runs this script in its own process and reads the
JSON it prints last. Every check is batched here to pay for one JAX start-up.

Run by hand: python tests/_sharding_worker.py
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")

import functools  # pylint: disable=g-import-not-at-top,wrong-import-position
import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jadam

STEPS = 3
EXPLICIT_SUBSET = ("adam", "amsgrad")
BATCH, N_IN, HIDDEN, N_OUT = 32, 8, 32, 8


def spec_str(spec) -> str:
  """A PartitionSpec as newer JAX prints it (older JAX prints
  ``PartitionSpec('data',)``), so results compare across versions."""
  return "P" + str(tuple(spec))


def make_problem():
  """A two-layer tanh MLP on a fixed regression batch."""
  k = jax.random.split(jax.random.PRNGKey(0), 5)
  params = {
      "w1": 0.5 * jax.random.normal(k[0], (N_IN, HIDDEN)),
      "b1": 0.1 * jax.random.normal(k[1], (HIDDEN,)),
      "w2": 0.5 * jax.random.normal(k[2], (HIDDEN, N_OUT)),
      "b2": jnp.zeros((N_OUT,)),
  }
  x = jax.random.normal(k[3], (BATCH, N_IN))
  y = jnp.sin(x @ jax.random.normal(k[4], (N_IN, N_OUT)))
  return params, x, y


def contract_hidden(h, w2):
  """``h @ w2``; on an Explicit mesh, say the output is split like the batch."""
  typed = jax.typeof(h).sharding
  if typed.mesh.empty or AxisType.Explicit not in typed.mesh.axis_types:
    return h @ w2
  return jnp.matmul(h, w2, out_sharding=NamedSharding(
      typed.mesh, P(typed.spec[0], None)))


def loss_fn(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((contract_hidden(h, params["w2"]) + params["b2"] - y) ** 2)


# Where each parameter goes on each mesh: data parallel replicates, model
# parallel splits the hidden dimension, mixed does both.
PARAM_SPECS = {
    "data": {"w1": P(), "b1": P(), "w2": P(), "b2": P()},
    "model": {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None),
              "b2": P()},
    "mixed": {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None),
              "b2": P()},
}
BATCH_SPEC = {"data": P("data"), "model": P(), "mixed": P("data")}
MESH_SHAPES = {"data": ((8,), ("data",)), "model": ((8,), ("model",)),
               "mixed": ((4, 2), ("data", "model"))}


def make_mesh(kind, axis_type):
  shape, names = MESH_SHAPES[kind]
  return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))


def optimizers():
  """One optimizer per state layout (NAdam and RAdam are flags of the rule
  with Adam's state, so they add no placement case)."""
  txs = {
      "adam": jadam.adam(1e-2),
      "adamw_bf16_mu": jadam.adamw(1e-2, mu_dtype=jnp.bfloat16),
      "amsgrad": jadam.amsgrad(1e-2),
      "adamax": jadam.adamax(1e-2),
      "clipped_adam": optax.chain(optax.clip_by_global_norm(1.0),
                                  jadam.scale_by_adam(),
                                  optax.scale_by_learning_rate(1e-2)),
  }
  return txs


_REFERENCES = {}


def train_reference(tx, params, x, y, steps=STEPS):
  """Single device: everything on device 0, no mesh (memoised per tx)."""
  if id(tx) in _REFERENCES:
    return _REFERENCES[id(tx)]
  device = jax.devices()[0]
  params, x, y = jax.device_put((params, x, y), device)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  _REFERENCES[id(tx)] = params
  return params


def put(tree, mesh, specs):
  return jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)),
                      tree, specs)


def relative_error(a, b):
  fa = np.concatenate([np.ravel(np.asarray(v, np.float64))
                       for v in jax.tree.leaves(a)])
  fb = np.concatenate([np.ravel(np.asarray(v, np.float64))
                       for v in jax.tree.leaves(b)])
  return float(np.linalg.norm(fa - fb) / np.linalg.norm(fb))


def same_shardings(a, b):
  """Two trees of arrays placed alike, leaf by leaf."""
  return all(x.sharding.is_equivalent_to(y.sharding, x.ndim)
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def arrays(tree):
  """The state's arrays, without the scalar step count (kept on one device
  when init runs eagerly, replicated once a jitted step returns it)."""
  return [leaf for leaf in jax.tree.leaves(tree) if leaf.ndim]


def specs_of(tree):
  return [spec_str(leaf.sharding.spec) if isinstance(leaf.sharding, NamedSharding)
          else str(leaf.sharding) for leaf in jax.tree.leaves(tree)]


def follows_params(tx, state, params):
  """Each state leaf that mirrors a parameter has that parameter's sharding."""
  def same(leaf, param):
    sharding = leaf.sharding if isinstance(leaf, (jax.Array,
                                                  jax.ShapeDtypeStruct)) else None
    return bool(sharding is not None and sharding.is_equivalent_to(
        param.sharding, param.ndim))
  flags = optax.tree_map_params(tx, same, state, params,
                                transform_non_params=lambda _: True)
  return all(jax.tree.leaves(flags))


def check_placement(results):
  """Init under jit (and eagerly, and abstractly) follows the parameters."""
  params, x, y = make_problem()
  txs = TXS
  results["placement_optimizers"] = sorted(txs)
  out = {}
  for axis_type in (AxisType.Auto, AxisType.Explicit):
    for kind in ("data", "model", "mixed"):
      mesh = make_mesh(kind, axis_type)
      sharded = put(params, mesh, PARAM_SPECS[kind])
      xs = put(x, mesh, BATCH_SPEC[kind])
      ys = put(y, mesh, BATCH_SPEC[kind])
      abstract = jax.tree.map(
          lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
          sharded)
      for name, tx in txs.items():
        if axis_type == AxisType.Explicit and name not in EXPLICIT_SUBSET:
          continue  # every format on Auto meshes; Explicit typing spot-checked
        key = f"{axis_type.name}/{kind}/{name}"
        jit_state = jax.jit(tx.init)(sharded)
        eager_state = tx.init(sharded)
        abstract_st = jadam.sharding.abstract_state(tx, abstract)

        @jax.jit
        def step(params, state, x, y, tx=tx):
          grads = jax.grad(loss_fn)(params, x, y)
          updates, state = tx.update(grads, state, params)
          return optax.apply_updates(params, updates), state

        p, s = sharded, jit_state
        for _ in range(STEPS):
          p, s = step(p, s, xs, ys)
        out[key] = {
            "jit_init": follows_params(tx, jit_state, sharded),
            "eager_init": follows_params(tx, eager_state, sharded),
            "abstract_init": follows_params(tx, abstract_st, sharded),
            "after_steps": follows_params(tx, s, sharded),
            "params_keep_sharding": same_shardings(p, sharded),
            "error_vs_single_device": relative_error(
                p, train_reference(tx, params, x, y)),
        }
  results["placement"] = out
  # What optax does today, for the docs: its zeros land on one device.
  mesh = make_mesh("mixed", AxisType.Auto)
  state = jax.jit(optax.adam(1e-2).init)(put(params, mesh, PARAM_SPECS["mixed"]))
  results["optax_adam_jit_init_devices"] = len(
      state[0].mu["w1"].sharding.device_set)


def check_shard_map(results):
  """Adam inside shard_map on local shards equals single-device training."""
  params, x, y = make_problem()
  tx = TXS["adam"]
  reference = train_reference(tx, params, x, y)
  out = {}
  for kind in ("data", "model", "mixed"):
    mesh = make_mesh(kind, AxisType.Explicit)
    specs = PARAM_SPECS[kind]
    sharded = put(params, mesh, specs)
    state = jax.jit(tx.init)(sharded)
    state_specs = jax.tree.map(lambda a: a.sharding.spec, state)
    batch_spec = BATCH_SPEC[kind]
    model_axis = "model" if "model" in mesh.shape else None

    def local_loss(params, x, y, model_axis=model_axis):
      # Sum of squares over the local batch divided by the global count;
      # gradients of parameters replicated over an axis are summed over it
      # by shard_map's transpose, which makes this the global mean.
      h = jnp.tanh(x @ params["w1"] + params["b1"])
      partial = h @ params["w2"]
      if model_axis is not None:
        partial = jax.lax.psum(partial, model_axis)
      return jnp.sum((partial + params["b2"] - y) ** 2) / (BATCH * N_OUT)

    def local_step(params, state, x, y):
      grads = jax.grad(local_loss)(params, x, y)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    step = jax.jit(jax.shard_map(
        local_step, mesh=mesh,
        in_specs=(specs, state_specs, batch_spec, batch_spec),
        out_specs=(specs, state_specs)))
    xs, ys = put(x, mesh, batch_spec), put(y, mesh, batch_spec)
    p, s = sharded, state
    for _ in range(STEPS):
      p, s = step(p, s, xs, ys)
    out[kind] = {"error_vs_single_device": relative_error(p, reference),
                 "state_follows_params": follows_params(tx, s, sharded)}
  results["shard_map"] = out


def max_bytes(tree):
  return max(jadam.sharding.bytes_per_device(tree).values())


def check_zero1(results):
  """ZeRO-1: state split over data, params replicated, same numbers."""
  params, x, y = make_problem()
  tx = TXS["adam"]
  reference = train_reference(tx, params, x, y)
  out = {}
  for axis_type in (AxisType.Auto, AxisType.Explicit):
    for kind in ("data", "mixed"):
      mesh = make_mesh(kind, axis_type)
      sharded = put(params, mesh, PARAM_SPECS[kind])
      xs = put(x, mesh, BATCH_SPEC[kind])
      ys = put(y, mesh, BATCH_SPEC[kind])
      ztx = jadam.sharding.zero1(tx, mesh, "data")

      # Auto axes leave output placement to the compiler: say where the
      # parameters go (replicated over data), as one does with Auto meshes.
      # Explicit axes need nothing: zero1 reshards the updates itself.
      param_out = (jax.tree.map(lambda a: a.sharding, sharded)
                   if axis_type == AxisType.Auto else None)

      @functools.partial(jax.jit, out_shardings=(param_out, None))
      def step(params, state, x, y, ztx=ztx):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, state = ztx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

      for init in ("eager", "jit", "out_shardings"):
        if init == "eager":
          state = ztx.init(sharded)
        elif init == "jit":
          state = jax.jit(ztx.init)(sharded)
        else:
          state = jax.jit(tx.init, out_shardings=jadam.sharding.zero1_shardings(
              tx, sharded, "data"))(sharded)
        init_specs = specs_of(state)
        p, s = sharded, state
        for _ in range(STEPS):
          p, s = step(p, s, xs, ys)
        out[f"{axis_type.name}/{kind}/{init}"] = {
            "state_specs": init_specs,
            "state_specs_kept": same_shardings(arrays(s), arrays(state)),
            "params_keep_sharding": same_shardings(p, sharded),
            "error_vs_single_device": relative_error(p, reference),
            "state_bytes_per_device": max_bytes(s),
            "state_bytes_following_params": max_bytes(
                jax.jit(tx.init)(sharded)),
        }
  results["zero1"] = out


def check_zero1_bytes(results):
  """Per-device state bytes for a 4.2M-parameter model on 8 devices."""
  mesh = make_mesh("data", AxisType.Explicit)
  replicated = NamedSharding(mesh, P())
  params = {"embed": jnp.zeros((4096, 512)), "dense": jnp.zeros((512, 4096)),
            "bias": jnp.zeros((4096,)), "odd": jnp.zeros((3, 5))}
  params = jax.device_put(params, replicated)
  n_params = sum(a.size for a in jax.tree.leaves(params))
  out = {"n_params": int(n_params), "devices": 8}
  formats = {"f32": {}, "bf16": {"mu_dtype": jnp.bfloat16,
                                 "nu_dtype": jnp.bfloat16}}
  formats["int8"] = {"mu_dtype": jadam.BlockwiseInt8(),
                     "nu_dtype": jadam.BlockwiseInt8()}
  for name, kwargs in formats.items():
    tx = jadam.adam(1e-3, **kwargs)
    plain = jax.jit(tx.init)(params)
    split = jadam.sharding.zero1(tx, mesh).init(params)
    out[name] = {"replicated": max_bytes(plain), "zero1": max_bytes(split),
                 "zero1_min": min(jadam.sharding.bytes_per_device(split).values())}
  out["params_per_device"] = max_bytes(params)
  results["zero1_bytes"] = out


TXS = optimizers()


def check_int8(results):
  """Quantized moments: codes and scales split like the parameter's blocks.

  ``w2`` (32, 8) split over "model" on 8 devices is 8 consecutive pieces of
  32 elements; with 32-element blocks each device must hold one block of
  codes and one scale, on every path (jit, eager, abstract) and after steps.
  """
  try:
    fmt = jadam.BlockwiseInt8(block_size=32, min_size=0)
    tx = jadam.adam(1e-2, mu_dtype=fmt, nu_dtype=fmt)
    state = jax.eval_shape(tx.init, make_problem()[0])
    if not isinstance(state[0].mu["w2"], jadam.Int8Moment):
      raise TypeError(f"mu['w2'] is a {type(state[0].mu['w2']).__name__}, "
                      "not a jadam.Int8Moment")
  except (ImportError, TypeError, ValueError, AttributeError) as e:
    results["int8"] = {"available": False, "why": f"{type(e).__name__}: {e}"}
    return
  params, x, y = make_problem()
  out = {"available": True}
  for axis_type in (AxisType.Auto, AxisType.Explicit):
    mesh = make_mesh("model", axis_type)
    sharded = put(params, mesh, PARAM_SPECS["model"])
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
        sharded)
    xs, ys = put(x, mesh, P()), put(y, mesh, P())

    @jax.jit
    def step(params, state, tx=tx, xs=xs, ys=ys):
      grads = jax.grad(loss_fn)(params, xs, ys)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    jit_state = jax.jit(tx.init)(sharded)
    states = {"jit": jit_state, "eager": tx.init(sharded),
              "abstract": jadam.sharding.abstract_state(tx, abstract)}
    try:
      p, s = sharded, jit_state
      for _ in range(STEPS):
        p, s = step(p, s)
      states["after_steps"] = s
      out[f"{axis_type.name}/finite"] = bool(all(
          np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(p)))
    except Exception as e:  # pylint: disable=broad-except
      out[f"{axis_type.name}/step_error"] = f"{type(e).__name__}: {e}"[:300]
    for name, state in states.items():
      # The moment is one jadam.Int8Moment leaf: parameter-shaped int8
      # codes and their float32 block scales (shape (n_blocks,)).
      codes = state[0].mu["w2"].codes
      scales = state[0].mu["w2"].scales
      out[f"{axis_type.name}/{name}"] = {
          "codes_dtype": str(codes.dtype),
          "codes": spec_str(codes.sharding.spec),
          "codes_follow_param": codes.sharding.is_equivalent_to(
              sharded["w2"].sharding, codes.ndim),
          "scales_shape": list(scales.shape),
          "scales": spec_str(scales.sharding.spec)}
    # Steps must run and keep the codes split on Auto and Explicit meshes;
    # a failure is reported as a worker error, which the tests assert away.
    after = out.get(f"{axis_type.name}/after_steps", {})
    if not (out.get(f"{axis_type.name}/finite")
            and after.get("codes_follow_param")
            and after.get("scales") == "P('model',)"):
      results.setdefault("errors", {})[f"check_int8/{axis_type.name}"] = (
          out.get(f"{axis_type.name}/step_error", after))
  results["int8"] = out


def check_flat(results):
  """The fast path: one flat buffer per dtype, split or replicated over data.

  Split is the FSDP-like layout (each device keeps 1/8 of the parameters and
  of the state); the loss gathers the buffer before slicing it into leaves.
  """
  if not hasattr(jadam, "FlatView"):
    results["flat"] = {"available": False}
    return
  params, x, y = make_problem()
  view = jadam.FlatView(params)
  flat = view.ravel(params)
  tx = TXS["adam"]

  def flat_loss(flat, x, y):
    gathered = {}
    for key, buffer in flat.items():
      typed = jax.typeof(buffer).sharding
      if not typed.mesh.empty and AxisType.Explicit in typed.mesh.axis_types:
        buffer = jax.sharding.reshard(buffer, NamedSharding(typed.mesh, P()))
      gathered[key] = buffer
    return loss_fn(view.unravel(gathered), x, y)

  def train(flat, x, y, state):
    @jax.jit
    def step(flat, state):
      grads = jax.grad(flat_loss)(flat, x, y)
      updates, state = tx.update(grads, state, flat)
      return optax.apply_updates(flat, updates), state
    for _ in range(STEPS):
      flat, state = step(flat, state)
    return flat, state

  device = jax.devices()[0]
  one = jax.device_put((flat, x, y), device)
  reference, _ = train(*one, tx.init(one[0]))
  out = {"available": True, "buffers": {k: int(v.size) for k, v in flat.items()}}
  for axis_type in (AxisType.Auto, AxisType.Explicit):
    mesh = make_mesh("data", axis_type)
    for layout, spec in (("split", P("data")), ("replicated", P())):
      placed = put(flat, mesh, {k: spec for k in flat})
      abstract = jax.tree.map(
          lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
          placed)
      state = jax.jit(tx.init)(placed)
      p, s = train(placed, put(x, mesh, P("data")), put(y, mesh, P("data")),
                   state)
      out[f"{axis_type.name}/{layout}"] = {
          "jit_init": follows_params(tx, state, placed),
          "abstract_init": follows_params(
              tx, jadam.sharding.abstract_state(tx, abstract), placed),
          "after_steps": follows_params(tx, s, placed),
          "error_vs_single_device": relative_error(p, reference),
      }
  results["flat"] = out


def check_telemetry(results):
  """with_telemetry (alone and under zero1) on Explicit and Auto meshes with
  split parameters: the step runs and the statistics equal one device's."""
  params, x, y = make_problem()
  out = {}
  for axis_type in (AxisType.Explicit, AxisType.Auto):
    for kind in ("data", "model", "mixed"):
      mesh = make_mesh(kind, axis_type)
      split = {"data": (P("data"), P("data")),
               "model": (P(None, "model"), P("model", None)),
               "mixed": (P("data", "model"), P("model", "data"))}[kind]
      sharded = put(params, mesh, {"w1": split[0], "b1": P(),
                                   "w2": split[1], "b2": P()})
      txs = [("telemetry", jadam.with_telemetry(jadam.adam(1e-2)))]
      if "data" in mesh.axis_names:
        txs.append(("zero1_telemetry", jadam.sharding.zero1(
            jadam.with_telemetry(jadam.adam(1e-2)), mesh, "data")))
      for name, tx in txs:
        grads = jax.tree.map(lambda a: a * 0.5, sharded)
        state = tx.init(sharded)
        _, state = jax.jit(tx.update)(grads, state, sharded)
        one = jadam.with_telemetry(jadam.adam(1e-2))
        single = jax.device_put(params, jax.devices()[0])
        _, ref = one.update(jax.tree.map(lambda a: a * 0.5, single),
                            one.init(single), single)
        got, want = jadam.stats(state), jadam.stats(ref)
        out[f"{axis_type.name}/{kind}/{name}"] = max(
            abs(float(got[k]) - float(want[k])) / max(abs(float(want[k])),
                                                      1e-30)
            for k in want)
  results["telemetry"] = out


def main():
  results = {"device_count": jax.device_count(), "jax": jax.__version__}
  if os.environ.get("JADAM_TEST_SINGLE_PASS"):
    # Run with XLA:CPU multi-output fusion on (tests/test_sharding.py sets
    # it): every leaf, however small, takes the single-pass form.
    from jadam import _fusion  # pylint: disable=import-outside-toplevel
    _fusion.MIN_SIZE = 0
    results["single_pass"] = _fusion.single_pass(1)
  for check in (check_placement, check_shard_map, check_zero1,
                check_zero1_bytes, check_int8, check_flat, check_telemetry):
    try:
      check(results)
    except Exception as e:  # pylint: disable=broad-except
      where = [f for f in traceback.extract_tb(e.__traceback__)
               if "site-packages" not in f.filename][-3:]
      results.setdefault("errors", {})[check.__name__] = (
          f"{type(e).__name__}: {e} at "
          + " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}"
                        for f in reversed(where)))
  print(json.dumps(results))


if __name__ == "__main__":
  main()

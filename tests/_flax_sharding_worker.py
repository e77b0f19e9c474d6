"""Flax's standard ways of sharding optimizer state, on 4 simulated devices,
for every storage format; prints one JSON object (tests/test_flax_sharding.py).

* Linen the way Flax's ``examples/lm1b`` does it: logically partitioned
  parameters into ``TrainState.create``, ``nn.get_partition_spec`` of
  ``jax.eval_shape(init)``, ``nn.logical_to_mesh_sharding``, a jitted init
  with ``out_shardings`` on a 2-device fsdp mesh, then jitted steps on the
  boxed state, compared with the same training on one device, unboxed.
* ``jax.eval_shape(tx.init, boxed_params)`` with ``nn.with_partitioning``
  mesh names: its ``nn.get_partition_spec`` used as ``out_shardings`` on a
  2x2 mesh.
* ``optax.tree_map_params`` and ``jadam.sharding.state_specs`` specs used as
  ``out_shardings`` on the 2x2 mesh.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # pylint: disable=wrong-import-position
import sys  # pylint: disable=wrong-import-position

import flax.linen as nn  # pylint: disable=wrong-import-position
from flax.training import train_state  # pylint: disable=wrong-import-position
import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position

import jadam  # pylint: disable=wrong-import-position

sys.path.insert(0, os.path.dirname(__file__))
from _flax_cases import STORAGES  # pylint: disable=wrong-import-position

RULES = (("vocab", "fsdp"), ("embed", None), ("mlp", "fsdp"))


class Lm(nn.Module):
  """Embedding rows of 64 (per-row blocks), a (64, 512) kernel (blocks of
  256 within rows, leading axis replicated) and a (512, 64) kernel
  (leading axis split): every case of the scale placement rule."""

  @nn.compact
  def __call__(self, tokens):
    h = nn.Embed(256, 64, embedding_init=nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ("vocab", "embed")))(tokens)
    h = nn.Dense(512, kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("embed", "mlp")))(h)
    h = nn.Dense(64, kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("mlp", "embed")))(jnp.tanh(h))
    return h


def spec_str(sharding):
  return str(tuple(sharding.spec))


def is_int8(x):
  return isinstance(x, jadam.Int8Moment)


def array_of(moment):
  """A moment leaf's parameter-shaped array: the codes of an int8 moment."""
  return moment.codes if is_int8(moment) else moment


def int8_scales(moments):
  """{name: the block scales} of the int8 leaves of a flat moment dict, or
  None when no leaf is stored in int8 (leaves below min_size stay float)."""
  scales = {k: v.scales for k, v in moments.items() if is_int8(v)}
  return scales or None


def linen_lm1b_way(storage):
  mesh = jax.make_mesh((2,), ("fsdp",), devices=jax.devices()[:2],
                       axis_types=(jax.sharding.AxisType.Auto,))
  tx = jadam.adamw(1e-2, weight_decay=1e-2, **storage)
  tokens = jax.random.randint(jax.random.key(1), (4, 8), 0, 256)
  target = jax.random.normal(jax.random.key(2), (4, 8, 64))

  def initialize(rng):
    variables = Lm().init(rng, tokens)
    return train_state.TrainState.create(
        apply_fn=Lm().apply, params=variables["params"], tx=tx)

  def train_step(state):
    def loss(params):
      return jnp.mean((state.apply_fn({"params": params}, tokens)
                       - target) ** 2)
    return state.apply_gradients(grads=jax.grad(loss)(state.params))

  abstract = jax.eval_shape(initialize, jax.random.key(0))
  logical = nn.get_partition_spec(abstract)
  shardings = nn.logical_to_mesh_sharding(logical, mesh, RULES)
  state = jax.jit(initialize, out_shardings=shardings)(jax.random.key(0))
  step = jax.jit(train_step, in_shardings=(shardings,),
                 out_shardings=shardings)
  for _ in range(3):
    state = step(state)
  state = nn.unbox(state)

  reference = nn.unbox(jax.jit(initialize)(jax.random.key(0)))
  plain_step = jax.jit(train_step)
  for _ in range(3):
    reference = plain_step(reference)

  adam = state.opt_state[0]
  nu = adam.nu
  out = {
      "param_error": max(
          float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
          for a, b in zip(jax.tree.leaves(state.params),
                          jax.tree.leaves(reference.params))),
      "mu_embedding": spec_str(
          array_of(adam.mu["Embed_0"]["embedding"]).sharding),
      "nu_dtype": str(array_of(nu["Embed_0"]["embedding"]).dtype),
  }
  # int8 block scales sit inside each jadam.Int8Moment leaf.
  if any(is_int8(x) for x in jax.tree.leaves(nu, is_leaf=is_int8)):
    out["scales"] = {
        name: spec_str(nu[module]["kernel" if module != "Embed_0"
                                  else "embedding"].scales.sharding)
        for name, module in (("embedding", "Embed_0"), ("in", "Dense_0"),
                             ("out", "Dense_1"))}
    bias = nu["Dense_0"]["bias"]  # below min_size: a plain float array
    out["bias_scales"] = repr(bias.scales if is_int8(bias) else None)
  return out


def boxed_eval_shape(storage):
  """Specs from ``jax.eval_shape(tx.init, boxed)`` valid on a 2x2 mesh."""
  mesh = jax.make_mesh((2, 2), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  init = nn.with_partitioning(nn.initializers.normal(1.0), ("data", "model"))
  boxed = {"w": init(jax.random.key(0), (128, 96)),
           "e": nn.with_partitioning(nn.initializers.normal(1.0),
                                     ("model", None))(
                                         jax.random.key(1), (256, 32))}
  tx = jadam.adam(1e-3, **storage)
  specs = nn.get_partition_spec(jax.eval_shape(tx.init, boxed))
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  state = jax.jit(tx.init, out_shardings=shardings)(nn.unbox(boxed))[0]
  scales = int8_scales(state.nu)
  return {
      "mu_w": spec_str(array_of(state.mu["w"]).sharding),
      "scales": None if scales is None else {
          k: spec_str(v.sharding) for k, v in scales.items()},
  }


def tree_map_params_and_state_specs(storage):
  mesh = jax.make_mesh((2, 2), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  params = {"w": jnp.ones((64, 128)), "b": jnp.ones(128),
            "e": jnp.ones((512, 32))}
  param_specs = {"w": P("data", "model"), "b": P("model"),
                 "e": P("data", None)}
  tx = jadam.adamw(1e-3, **storage)
  state = tx.init(params)
  # The recipe of docs/distributed.md: an int8 moment is one leaf for
  # tree_map_params (is_leaf); its codes take the parameter's spec and its
  # block scales P(), replicated.
  is_moment = lambda x: isinstance(x, jadam.Int8Moment)

  def via_optax():
    return optax.tree_map_params(
        tx, lambda x, spec: jadam.Int8Moment(spec, P()) if is_moment(x)
        else spec, state, param_specs, transform_non_params=lambda _: P(),
        is_leaf=is_moment)

  def via_jadam():
    return jadam.sharding.state_specs(tx, params, param_specs)

  out = {}
  for name, make_specs in (("optax", via_optax), ("jadam", via_jadam)):
    try:
      specs = make_specs()
      shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
      placed = jax.jit(tx.init, out_shardings=shardings)(params)
    except Exception as e:  # pylint: disable=broad-except
      # Reported in the results, so that the other cases still run.
      out[name] = {"error": f"{type(e).__name__}: {e}"[:600]}
      continue
    scales = int8_scales(placed[0].nu)
    out[name] = {
        "mu_w": spec_str(array_of(placed[0].mu["w"]).sharding),
        "scales": None if scales is None else {
            k: spec_str(v.sharding) for k, v in scales.items()}}
  return out


def main():
  results = {}
  for name, storage in STORAGES.items():
    results[name] = {"linen": linen_lm1b_way(storage),
                     "eval_shape": boxed_eval_shape(storage),
                     "specs": tree_map_params_and_state_specs(storage)}
  print(json.dumps(results))


if __name__ == "__main__":
  main()

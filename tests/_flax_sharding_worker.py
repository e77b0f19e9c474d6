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
  scales = getattr(adam, "scales", None)
  out = {
      "param_error": max(
          float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
          for a, b in zip(jax.tree.leaves(state.params),
                          jax.tree.leaves(reference.params))),
      "mu_embedding": spec_str(adam.mu["Embed_0"]["embedding"].sharding),
      "nu_dtype": str(adam.nu["Embed_0"]["embedding"].dtype),
  }
  if scales is not None:
    nu_scales = scales.nu
    out["scales"] = {
        name: spec_str(nu_scales[module]["kernel" if module != "Embed_0"
                                         else "embedding"].sharding)
        for name, module in (("embedding", "Embed_0"), ("in", "Dense_0"),
                             ("out", "Dense_1"))}
    out["bias_scales"] = repr(nu_scales["Dense_0"]["bias"])
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
  scales = getattr(state, "scales", None)
  return {
      "mu_w": spec_str(state.mu["w"].sharding),
      "scales": None if scales is None else {
          k: spec_str(v.sharding) for k, v in scales.nu.items()
          if v is not None},
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
  # The recipe of docs/distributed.md: scales (not parameter-shaped) get
  # transform_non_params's P(), replicated.
  via_optax = optax.tree_map_params(
      tx, lambda _, spec: spec, state, param_specs,
      transform_non_params=lambda _: P())
  via_jadam = jadam.sharding.state_specs(tx, params, param_specs)
  out = {}
  for name, specs in (("optax", via_optax), ("jadam", via_jadam)):
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    placed = jax.jit(tx.init, out_shardings=shardings)(params)
    scales = getattr(placed[0], "scales", None)
    out[name] = {
        "mu_w": spec_str(placed[0].mu["w"].sharding),
        "scales": None if scales is None else {
            k: spec_str(v.sharding) for k, v in scales.nu.items()
            if v is not None}}
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

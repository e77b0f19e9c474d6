"""Flax's standard ways of sharding optimizer state work for every storage
format: Linen logical partitioning the lm1b way, NNX ``with_partitioning``
with ``nnx.Optimizer`` (saved and restored with orbax), ``optax.
tree_map_params`` with and without ``rest``, ``jax.eval_shape`` of a boxed
init; and the NNX FlatView recipe on a model that draws randomness."""

import functools
import os
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import jadam

sys.path.insert(0, os.path.dirname(__file__))
from _flax_cases import STORAGES  # pylint: disable=wrong-import-position
from conftest import assert_bitwise  # pylint: disable=wrong-import-position
from conftest import run_json_worker  # pylint: disable=wrong-import-position

INT8 = [name for name, s in STORAGES.items() if "int8" in s.values()]
INT8_MU = [name for name, s in STORAGES.items() if s.get("mu_dtype") == "int8"]


@pytest.fixture(scope="module")
def worker():
  """The worker's results, from a fresh Python with 4 simulated devices."""
  path = os.path.join(os.path.dirname(__file__), "_flax_sharding_worker.py")
  return run_json_worker(f"import runpy; runpy.run_path({path!r}, "
                         "run_name='__main__')")


@pytest.mark.parametrize("storage", STORAGES)
def test_linen_logical_partitioning_lm1b_way_trains_like_one_device(
    worker, storage):
  linen = worker[storage]["linen"]
  # Sharded over a 2-device fsdp mesh, boxed state, three jitted steps of
  # 1e-2: equal to one device up to the order of the matmuls' reductions
  # (float32 moments: under 0.2% of one step; rounded moments round
  # different gradients).
  limit = 1e-4 if storage == "float32" else 2e-3
  assert linen["param_error"] < limit, linen
  assert linen["mu_embedding"] == "('fsdp', None)"


@pytest.mark.parametrize("storage", INT8)
def test_linen_int8_scales_follow_rows_or_are_replicated(worker, storage):
  linen = worker[storage]["linen"]
  assert linen["nu_dtype"] == "uint8"
  # Embedding rows of 64 and the (512, 64) kernel: a block per row, so the
  # scales split like the rows ('vocab' -> fsdp, 'mlp' -> fsdp); the
  # (64, 512) kernel's leading 'embed' is replicated by the rules, and so
  # are its scales. The 512-element bias is below min_size: no entry.
  assert linen["scales"] == {"embedding": "('fsdp',)", "in": "(None,)",
                             "out": "('fsdp',)"}
  assert linen["bias_scales"] == "None"


@pytest.mark.parametrize("storage", STORAGES)
def test_eval_shape_of_boxed_init_gives_specs_valid_on_2x2_mesh(
    worker, storage):
  result = worker[storage]["eval_shape"]
  assert result["mu_w"] == "('data', 'model')"
  if storage in INT8:
    # (128, 96): blocks of 96 never span rows -> 'data'; (256, 32) rows of
    # 32 -> the leading 'model'.
    assert result["scales"] == {"w": "('data',)", "e": "('model',)"}
  else:
    assert result["scales"] is None


@pytest.mark.parametrize("storage", STORAGES)
def test_tree_map_params_recipe_and_state_specs_place_on_2x2_mesh(
    worker, storage):
  specs = worker[storage]["specs"]
  for how in ("optax", "jadam"):
    assert "error" not in specs[how], (how, specs[how]["error"])
  assert specs["optax"]["mu_w"] == specs["jadam"]["mu_w"] == (
      "('data', 'model')")
  if storage in INT8:
    # tree_map_params with transform_non_params=P(): scales replicated;
    # state_specs: split like the rows.
    assert specs["optax"]["scales"] == {"w": "()", "e": "()"}
    assert specs["jadam"]["scales"] == {"w": "('data',)", "e": "('data',)"}


def _is_moment(x):
  return isinstance(x, jadam.Int8Moment)


@pytest.mark.parametrize("storage", STORAGES)
def test_tree_map_params_with_rest_never_gives_a_scale_a_params_spec(
    storage):
  """The recipe: an int8 moment is one leaf (is_leaf); its codes get the
  parameter's spec, its block scales P(); float moments the spec."""
  params = {"w": jnp.ones((64, 128)), "b": jnp.ones(128)}
  param_specs = {"w": P("data", "model"), "b": P("model")}
  tx = jadam.adam(1e-3, **STORAGES[storage])
  state = tx.init(params)
  specs = optax.tree_map_params(
      tx, lambda x, s: jadam.Int8Moment(s, P()) if _is_moment(x) else s,
      state, param_specs, is_leaf=_is_moment)
  adam, adam_specs = state[0], specs[0]
  for field in ("mu", "nu"):
    for key, spec in param_specs.items():
      moment, got = getattr(adam, field)[key], getattr(adam_specs, field)[key]
      if _is_moment(moment):  # w under int8 (b is below min_size)
        assert got == jadam.Int8Moment(spec, P())
      else:
        assert got == spec
  if storage in INT8:
    assert _is_moment(adam.nu["w"])
  for spec, leaf in zip(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(
      x, P)), jax.tree.leaves(state)):
    if isinstance(spec, P):
      assert len(spec) <= np.ndim(leaf)


@pytest.mark.parametrize("storage", STORAGES)
def test_tree_map_params_without_rest_maps_moments_only(storage):
  """With is_leaf, the function sees each moment once (an int8 moment as
  its Int8Moment), so the result has the parameters' structure."""
  params = {"w": jnp.ones((64, 128)), "b": jnp.ones(128)}
  tx = jadam.adam(1e-3, **STORAGES[storage])
  state = tx.init(params)
  shapes = optax.tree_map_params(
      tx, lambda x: x.codes.shape if _is_moment(x) else x.shape, state,
      is_leaf=_is_moment)
  assert shapes[0].mu == shapes[0].nu == {"w": (64, 128), "b": (128,)}
  assert (storage in INT8) == _is_moment(state[0].nu["w"])


class _Dense(nnx.Module):

  def __init__(self, rngs):
    self.linear = nnx.Linear(64, 128, kernel_init=nnx.with_partitioning(
        nnx.initializers.lecun_normal(), ("data", "model")), rngs=rngs)

  def __call__(self, x):
    return self.linear(x)


@pytest.mark.parametrize("storage", STORAGES)
def test_nnx_with_partitioning_optimizer_saves_restores_and_steps_bitwise(
    storage, tmp_path):
  x = jax.random.normal(jax.random.key(1), (8, 64))
  y = jax.random.normal(jax.random.key(2), (8, 128))
  loss = lambda model: jnp.mean((model(x) - y) ** 2)

  @nnx.jit
  def step(model, optimizer):
    optimizer.update(model, nnx.grad(loss)(model))

  def build():
    model = _Dense(nnx.Rngs(0))
    return model, nnx.Optimizer(
        model, jadam.adam(1e-2, **STORAGES[storage]), wrt=nnx.Param)

  with jax.set_mesh(jax.make_mesh((1, 1), ("data", "model"))):
    model, optimizer = build()
    specs = nnx.get_partition_spec(nnx.state(optimizer))
    adam_specs = specs["opt_state"][0]
    # Flax 0.12.0 gives bare specs, later releases specs in variables.
    bare = lambda x: x if isinstance(x, P) else (
        x.get_value() if hasattr(x, "get_value") else x.value)
    mu_kernel = adam_specs["mu"]["linear"]["kernel"]
    if storage in INT8_MU:  # an Int8Moment: its codes are parameter-shaped
      mu_kernel = mu_kernel["codes"]
    assert bare(mu_kernel) == P("data", "model")
    if storage in INT8:
      # Rows of 128: a block per row, the row axis name kept.
      assert bare(adam_specs["nu"]["linear"]["kernel"]["scales"]) == P("data")
    for _ in range(2):
      step(model, optimizer)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", nnx.state((model, optimizer)))
    checkpointer.wait_until_finished()

    restored_model, restored_optimizer = build()
    target = nnx.state((restored_model, restored_optimizer))
    nnx.update((restored_model, restored_optimizer),
               checkpointer.restore(tmp_path / "ckpt", target))
    for _ in range(2):
      step(model, optimizer)
      step(restored_model, restored_optimizer)
  assert_bitwise(nnx.state(restored_model), nnx.state(model))
  assert_bitwise(nnx.state(restored_optimizer), nnx.state(optimizer))


class _Vae(nnx.Module):
  """Dropout and a sampling step: both draw from ``nnx.Rngs`` streams whose
  counters are state the forward pass changes."""

  def __init__(self, rngs):
    self.encoder = nnx.Linear(32, 16, rngs=rngs)
    self.dropout = nnx.Dropout(0.2, rngs=rngs)
    self.decoder = nnx.Linear(8, 32, rngs=rngs)
    self.rngs = rngs

  def __call__(self, x):
    h = self.dropout(self.encoder(x))
    mean, log_std = h[:, :8], h[:, 8:]
    z = mean + jnp.exp(log_std) * self.rngs.noise.normal(mean.shape)
    return self.decoder(z), mean, log_std


def _vae_loss(model, x):
  recon, mean, log_std = model(x)
  kl = jnp.mean(mean ** 2 + jnp.exp(2 * log_std) - 2 * log_std - 1)
  return jnp.mean((recon - x) ** 2) + 0.1 * kl


@pytest.mark.parametrize("storage", STORAGES)
def test_nnx_flatview_recipe_trains_a_model_that_draws_randomness(storage):
  x = jax.random.normal(jax.random.key(3), (64, 32))

  def make():
    return _Vae(nnx.Rngs(params=0, dropout=1, noise=2))

  # The recipe of docs/performance.md: merge with copy=True inside the loss
  # (the RNG counters are mutated at the loss's trace level) and carry the
  # non-parameter state out of the step.
  model = make()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  view = jadam.FlatView(params)
  tx = jadam.adam(1e-2, **STORAGES[storage])
  flat = view.ravel(params)
  state = tx.init(flat)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def flat_step(flat, state, rest):
    def loss_fn(flat):
      model = nnx.merge(graphdef, view.unravel(flat), rest, copy=True)
      return _vae_loss(model, x), nnx.state(model, nnx.Not(nnx.Param))
    (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(flat)
    updates, state = tx.update(grads, state, flat)
    return optax.apply_updates(flat, updates), state, rest, loss

  # The same training on the parameter tree, with nnx.Optimizer.
  tree_model = make()
  optimizer = nnx.Optimizer(tree_model, jadam.adam(
      1e-2, **STORAGES[storage]), wrt=nnx.Param)

  @nnx.jit
  def tree_step(model, optimizer):
    loss, grads = nnx.value_and_grad(_vae_loss)(model, x)
    optimizer.update(model, grads)
    return loss

  flat_losses, tree_losses = [], []
  for _ in range(20):
    flat, state, rest, loss = flat_step(flat, state, rest)
    flat_losses.append(float(loss))
    tree_losses.append(float(tree_step(tree_model, optimizer)))
  nnx.update(model, view.unravel(flat), rest)
  # Same draws, same parameters: the flat and tree paths agree step by step
  # (float32 moments to 1e-5; rounded moments round at other positions).
  tol = 1e-5 if storage == "float32" else 5e-2
  np.testing.assert_allclose(flat_losses, tree_losses, rtol=tol)
  assert flat_losses[-1] < 0.8 * flat_losses[0]
  # The RNG counters advanced once per step, as the tree path's did.
  assert_bitwise(nnx.state(model, nnx.RngCount),
                 nnx.state(tree_model, nnx.RngCount))


def test_original_recipe_without_copy_fails_on_randomness():
  """Why the recipe says copy=True: without it Flax refuses to mutate the
  RNG counters of ``rest`` from inside the traced loss."""
  model = _Vae(nnx.Rngs(params=0, dropout=1, noise=2))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  view = jadam.FlatView(params)
  x = jnp.ones((4, 32))

  @jax.jit
  def loss(flat):
    return _vae_loss(nnx.merge(graphdef, view.unravel(flat), rest), x)
  try:
    jax.grad(loss)(view.ravel(params))
  except Exception as e:  # pylint: disable=broad-except
    assert "trace" in str(e).lower(), e
  else:
    pytest.skip("this Flax merges without copy=True on traced randomness")


def test_jadam_does_not_import_flax():
  code = ("import sys, jax.numpy as jnp, jadam; "
          "jadam.adam(1e-3, nu_dtype='int8').init({'w': jnp.ones((64, 64))}); "
          "print(any(m == 'flax' or m.startswith('flax.') "
          "for m in sys.modules))")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True,
                        text=True, check=True)
  assert done.stdout.strip() == "False"

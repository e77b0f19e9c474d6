"""jadam accepts every pytree a JAX user trains."""

import importlib
import subprocess
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
from conftest import relative_error, train


class Pair(NamedTuple):
  left: jax.Array
  right: jax.Array


def _one_step(opt, params, grads):
  state = opt.init(params)
  updates, state = jax.jit(opt.update)(grads, state, params)
  return updates, state


@pytest.mark.parametrize("params", [
    {"a": jnp.ones(3), "b": {"c": jnp.ones((2, 2))}},
    [jnp.ones(3), (jnp.ones(2), jnp.ones(1))],
    Pair(jnp.ones(2), jnp.ones(3)),
    {"scalar": jnp.array(2.0), "empty": jnp.zeros((0, 4)), "w": jnp.ones(4)},
], ids=["dict", "list_tuple", "namedtuple", "scalar_and_zero_size"])
def test_containers_match_optax(params):
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  ours, state = _one_step(jadam.adam(0.1), params, grads)
  theirs, _ = _one_step(optax.adam(0.1), params, grads)
  assert jax.tree.structure(ours) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert jax.tree.structure(state[0].mu) == jax.tree.structure(params)


def test_none_leaves_are_passed_through():
  params = {"w": jnp.ones(2), "frozen": None}
  updates, state = _one_step(jadam.adam(0.1), params,
                             {"w": jnp.ones(2), "frozen": None})
  assert updates["frozen"] is None
  assert state[0].mu["frozen"] is None
  np.testing.assert_allclose(updates["w"], [-0.1, -0.1], rtol=1e-5)


def test_masked_nodes_inside_optax_masked():
  params = {"w": jnp.ones(2), "b": jnp.ones(2)}
  opt = optax.masked(jadam.adam(0.1), {"w": True, "b": False})
  state = opt.init(params)
  assert isinstance(state.inner_state[0].mu["b"], optax.MaskedNode)
  updates, _ = jax.jit(opt.update)({"w": jnp.ones(2), "b": jnp.ones(2)}, state, params)
  np.testing.assert_allclose(updates["w"], [-0.1, -0.1], rtol=1e-5)
  np.testing.assert_allclose(updates["b"], [1.0, 1.0])  # untouched


def test_flax_linen_parameter_tree():
  import flax.linen as nn
  model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(1)])
  x = jnp.ones((4, 3))
  params = model.init(jax.random.PRNGKey(0), x)
  loss = lambda p: jnp.mean(model.apply(p, x) ** 2)
  ours, _ = train(jadam.adam(1e-2), params, loss, 20)
  theirs, _ = train(optax.adam(1e-2), params, loss, 20)
  assert relative_error(ours, theirs) < 1e-6
  assert jax.tree.structure(ours) == jax.tree.structure(params)


def test_bfloat16_params_with_float32_moments():
  params = {"w": jnp.ones(4, jnp.bfloat16)}
  opt = jadam.scale_by_adam(mu_dtype=jnp.float32, nu_dtype="float32")
  state = opt.init(params)
  assert state.mu["w"].dtype == jnp.float32
  assert state.nu["w"].dtype == jnp.float32
  grads = {"w": jnp.array([1e-3, -2.0, 3.0, 0.0], jnp.bfloat16)}
  updates, state = jax.jit(opt.update)(grads, state)
  assert updates["w"].dtype == jnp.bfloat16  # the update comes back like g
  assert state.mu["w"].dtype == jnp.float32
  # Moments kept in float32 hold (1 − β1)·g exactly as computed in float32.
  np.testing.assert_allclose(state.mu["w"],
                             0.1 * np.asarray(grads["w"], np.float32), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(updates["w"], np.float32),
                             [1.0, -1.0, 1.0, 0.0], rtol=1e-2)


def test_default_moments_follow_param_dtype():
  state = jadam.scale_by_adam().init({"h": jnp.ones(2, jnp.bfloat16)})
  assert state.mu["h"].dtype == jnp.bfloat16
  assert state.nu["h"].dtype == jnp.bfloat16


def test_complex_parameters_use_abs_squared():
  params = jnp.array([1 + 1j, 2 - 1j], jnp.complex64)
  grads = jnp.array([3 + 4j, 0 - 2j], jnp.complex64)
  opt = jadam.scale_by_adam()
  state = opt.init(params)
  assert state.nu.dtype == jnp.float32  # |g|² is real
  updates, state = jax.jit(opt.update)(grads, state)
  np.testing.assert_allclose(state.nu, 0.001 * np.array([25.0, 4.0]), rtol=1e-6)
  # First step: g / (|g| + ε), a unit complex number in g's direction.
  np.testing.assert_allclose(updates, np.array([0.6 + 0.8j, -1j]), rtol=1e-5)


def test_complex_training_matches_optax():
  target = jnp.array([1 - 2j, 0.5j, -1.0], jnp.complex64)
  loss = lambda z: jnp.sum(jnp.abs(z - target) ** 2)
  params = jnp.zeros(3, jnp.complex64)
  ours, _ = train(jadam.adam(1e-2), params, loss, 200)
  theirs, _ = train(optax.adam(1e-2), params, loss, 200)
  np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)


def test_every_public_name_has_one_spelling():
  """``__all__`` is what the top level binds (in a fresh interpreter, before
  any old module is imported); variants live in ``jadam.contrib``,
  placement in ``jadam.sharding``; each old spelling forwards to the same
  object with a DeprecationWarning naming the new one."""
  code = ("import jadam; print(sorted(set(jadam.__all__) ^ {n for n in "
          "dir(jadam) if not n.startswith('_')}))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True).stdout.strip()
  assert out == "[]"
  assert set(jadam.contrib.__all__) == {
      "adopt", "scale_by_adopt", "ademamix", "scale_by_ademamix",
      "ademamix_b3_schedule", "ScaleByAdemamixState", "schedule_free_adamw",
      "schedule_free_eval_params", "ScaleBySecondMomentState"}
  assert set(jadam.sharding.__all__) == {
      "zero1", "zero1_shardings", "abstract_state", "state_shardings",
      "bytes_per_device", "offload", "place_scalars", "state_specs",
      "scales_follow_rows"}
  assert set(jadam.rule.__all__) == {"AdamRule", "Moments", "adam_step"}
  old = {"zero1": jadam.sharding, "offload": jadam.sharding,
         "adopt": jadam.contrib, "schedule_free_adamw": jadam.contrib,
         "adam_step": jadam.rule}
  for name, module in old.items():
    with pytest.warns(DeprecationWarning, match=f"is now {module.__name__}"):
      assert getattr(jadam, name) is getattr(module, name)
  for module, name in (("jadam.health", "skip_nonfinite"),
                       ("jadam.storage", "BlockwiseInt8"),
                       ("jadam.cpu", "enable_cpu_fusion")):
    module = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=f"is now jadam.{name}"):
      assert getattr(module, name) is getattr(jadam, name)


@pytest.mark.parametrize("make", [
    lambda m: m.adam(1e-3), lambda m: m.amsgrad(1e-3),
    lambda m: m.adamw(1e-3)])
def test_python_float_and_integer_leaves_initialise_as_in_optax(make):
  # A Python float parameter, an integer step counter and a boolean buffer:
  # optax initialises them, and so does jadam, with the same dtypes.
  params = {"w": jnp.ones(3), "temperature": 1.0, "step": jnp.int32(4),
            "flag": jnp.array(True)}
  ours, theirs = make(jadam).init(params), make(optax).init(params)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    assert a.dtype == b.dtype and a.shape == b.shape


def test_python_float_leaf_trains_like_optax():
  params = {"w": jnp.ones(3), "temperature": 1.0}
  grads = {"w": jnp.arange(3.0), "temperature": jnp.asarray(0.5)}
  ours, _ = jadam.adam(1e-2).update(grads, jadam.adam(1e-2).init(params),
                                    params)
  theirs, _ = optax.adam(1e-2).update(grads, optax.adam(1e-2).init(params),
                                      params)
  np.testing.assert_allclose(ours["temperature"], theirs["temperature"],
                             rtol=1e-6)


def test_integer_gradient_names_its_key_path():
  params = {"w": jnp.ones(3), "step": jnp.int32(0)}
  tx = jadam.adam(1e-3)
  with pytest.raises(TypeError, match=r"\['step'\].*optax.masked"):
    tx.update({"w": jnp.ones(3), "step": jnp.int32(1)}, tx.init(params),
              params)

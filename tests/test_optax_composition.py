"""jadam transformations inside optax's combinators."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jadam
from conftest import PROBLEMS, relative_error, train


def test_chain_with_clipping_and_schedule_matches_optax():
  params, loss = PROBLEMS["mlp"]()
  schedule = optax.cosine_decay_schedule(3e-3, 200)
  ours = optax.chain(optax.clip_by_global_norm(0.5), jadam.scale_by_adam(),
                     optax.scale_by_learning_rate(schedule))
  theirs = optax.chain(optax.clip_by_global_norm(0.5), optax.scale_by_adam(),
                       optax.scale_by_learning_rate(schedule))
  a, _ = train(ours, params, loss, 200)
  b, _ = train(theirs, params, loss, 200)
  assert relative_error(a, b) < 1e-6


def test_multisteps_accumulates_then_steps():
  params, loss = PROBLEMS["quadratic"]()
  a, state = train(optax.MultiSteps(jadam.adam(1e-2), 4), params, loss, 40)
  b, _ = train(optax.MultiSteps(optax.adam(1e-2), 4), params, loss, 40)
  assert relative_error(a, b) < 1e-6
  assert int(state.inner_opt_state[0].count) == 10


def test_partition_gives_groups_their_own_rates():
  params = {"fast": jnp.zeros(2), "slow": jnp.zeros(2)}
  opt = optax.partition({"fast": jadam.adam(1.0), "slow": jadam.adam(0.01)},
                        {"fast": "fast", "slow": "slow"})
  state = opt.init(params)
  grads = {"fast": -jnp.ones(2), "slow": -jnp.ones(2)}
  updates, _ = opt.update(grads, state, params)
  np.testing.assert_allclose(updates["fast"], [1.0, 1.0], rtol=1e-5)
  np.testing.assert_allclose(updates["slow"], [0.01, 0.01], rtol=1e-5)


def test_apply_if_finite_skips_nan_steps():
  opt = optax.apply_if_finite(jadam.adam(0.1), max_consecutive_errors=5)
  params = jnp.ones(2)
  state = opt.init(params)
  updates, state = opt.update(jnp.array([jnp.nan, 1.0]), state, params)
  np.testing.assert_array_equal(updates, [0.0, 0.0])
  assert int(state.notfinite_count) == 1
  assert int(state.inner_state[0].count) == 0  # inner state untouched
  updates, state = opt.update(jnp.ones(2), state, params)
  np.testing.assert_allclose(updates, [-0.1, -0.1], rtol=1e-5)


def test_inject_hyperparams_changes_rate_without_recompiling():
  opt = optax.inject_hyperparams(jadam.adam)(learning_rate=0.1, b1=0.9)
  params = jnp.ones(3)
  state = opt.init(params)
  step = jax.jit(opt.update)
  for _ in range(2):  # the state from init and the state from jit
    updates, state = step(jnp.ones(3), state, params)
  np.testing.assert_allclose(updates, -0.1 * np.ones(3), rtol=1e-5)
  compiled = step._cache_size()
  for rate in (0.01, 0.003, 0.5):
    state.hyperparams["learning_rate"] = jnp.asarray(rate, jnp.float32)
    updates, state = step(jnp.ones(3), state, params)
    np.testing.assert_allclose(updates, -rate * np.ones(3), rtol=1e-5)
  assert step._cache_size() == compiled == 1

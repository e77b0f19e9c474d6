"""jadam under jit, vmap and buffer donation, and its step counter."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jadam


def test_vmap_trains_a_batch_of_independent_problems():
  targets = jnp.array([[1.0, 2.0], [-3.0, 0.5], [0.0, 10.0]])
  opt = jadam.adam(0.1)

  def solve(target):
    params = jnp.zeros(2)
    state = opt.init(params)
    def body(_, carry):
      params, state = carry
      grads = jax.grad(lambda p: jnp.sum((p - target) ** 2))(params)
      updates, state = opt.update(grads, state, params)
      return optax.apply_updates(params, updates), state
    return jax.lax.fori_loop(0, 500, body, (params, state))

  batched, states = jax.jit(jax.vmap(solve))(targets)
  np.testing.assert_allclose(batched, targets, atol=0.05)
  assert states[0].count.shape == (3,)
  # Each row equals solving that problem alone.
  alone, _ = jax.jit(solve)(targets[1])
  np.testing.assert_allclose(batched[1], alone, rtol=1e-6)


def test_vmap_over_update_with_shared_state_shape():
  opt = jadam.scale_by_adam()
  params = jnp.ones((4, 3))
  states = jax.vmap(opt.init)(params)
  grads = jnp.arange(12.0).reshape(4, 3)
  updates, new_states = jax.vmap(opt.update)(grads, states)
  single, _ = opt.update(grads[2], opt.init(params[2]))
  np.testing.assert_allclose(updates[2], single, rtol=1e-6)
  assert new_states.mu.shape == (4, 3)


def test_donated_params_and_state():
  opt = jadam.adamw(1e-2, weight_decay=1e-3)
  params = {"w": jnp.ones((64, 64)), "b": jnp.zeros(64)}
  state = opt.init(params)

  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  donated = jax.jit(step, donate_argnums=(0, 1))
  grads = jax.tree.map(jnp.ones_like, params)
  expected, _ = jax.jit(step)(params, state, grads)
  params_copy = jax.tree.map(jnp.copy, params)
  new_params, new_state = donated(params_copy, opt.init(params), grads)
  new_params, new_state = donated(new_params, new_state, grads)
  expected, _ = jax.jit(step)(*jax.jit(step)(params, state, grads), grads)
  np.testing.assert_allclose(new_params["w"], expected["w"], rtol=1e-6)
  assert params_copy["w"].is_deleted()  # really donated


def test_step_counter_saturates_at_int32_max():
  opt = jadam.scale_by_adam()
  state = opt.init(jnp.ones(2))
  big = jnp.iinfo(jnp.int32).max
  state = state._replace(count=jnp.asarray(big - 1, jnp.int32))
  for _ in range(3):
    updates, state = jax.jit(opt.update)(jnp.ones(2), state)
    assert int(state.count) == big  # never wraps to a negative step
    assert np.all(np.isfinite(updates))


def test_nesterov_counter_saturates_too():
  opt = jadam.scale_by_adam(nesterov=True)
  state = opt.init(jnp.ones(2))._replace(
      count=jnp.asarray(jnp.iinfo(jnp.int32).max, jnp.int32))
  updates, state = opt.update(jnp.ones(2), state)
  assert np.all(np.isfinite(updates))


def _compilations(tx, params, state, steps=4):
  """How many times a jitted training step compiles over ``steps`` calls."""
  @jax.jit
  def step(params, state):
    grads = jax.tree.map(lambda p: jnp.cos(p) + 0.1, params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return step._cache_size()  # pylint: disable=protected-access


COMMITTED = {"w": jnp.ones((64, 8)), "b": jnp.zeros(8)}


def test_eager_init_on_committed_params_compiles_the_step_once():
  # device_put (or a checkpoint restore) commits parameters to a device; the
  # jitted step returns the state committed there too. optax's eager init
  # leaves its step count uncommitted, so its second step compiles again;
  # jadam's init puts every piece of state where the step returns it.
  params = jax.device_put(COMMITTED, jax.devices()[0])
  optimizers = {
      "adam": jadam.adam(1e-3),
      "adamw_schedule": jadam.adamw(optax.cosine_decay_schedule(1e-3, 100)),
      "amsgrad_int8": jadam.amsgrad(1e-3, mu_dtype="int8", nu_dtype="int8"),
      "adopt": jadam.contrib.adopt(1e-3),
      "ademamix": jadam.contrib.ademamix(1e-3),
      "schedule_free": jadam.contrib.schedule_free_adamw(1e-3),
      "skip_telemetry": jadam.with_telemetry(jadam.skip_nonfinite(
          jadam.adam(1e-3, mu_dtype=jnp.bfloat16))),
  }
  for name, tx in optimizers.items():
    assert _compilations(tx, params, tx.init(params)) == 1, name
  assert _compilations(optax.adam(1e-3), params,
                       optax.adam(1e-3).init(params)) == 2  # optax's own


def test_place_scalars_makes_optax_wrappers_compile_once():
  params = jax.device_put(COMMITTED, jax.devices()[0])
  tx = optax.MultiSteps(jadam.adam(1e-3), every_k_schedule=2)
  assert _compilations(tx, params, tx.init(params)) == 2  # optax's scalars
  state = jadam.sharding.place_scalars(tx.init(params), params)
  assert _compilations(tx, params, state) == 1
  injected = optax.inject_hyperparams(jadam.adam)(learning_rate=1e-3)
  state = jadam.sharding.place_scalars(injected.init(params), params)
  assert _compilations(injected, params, state) == 1


def test_uncommitted_params_keep_uncommitted_state():
  tx = jadam.adam(1e-3)
  state = tx.init(COMMITTED)
  assert not state[0].count.committed and not state[0].mu["w"].committed
  assert _compilations(tx, COMMITTED, state) == 1

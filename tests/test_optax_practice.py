"""jadam in the optax recipes people train with.

``test_optax_composition.py`` checks that each combinator accepts jadam; the
tests here check that the recipes compute what they promise: the schedule's
value lands in each step, clipping happens before the moments, decoupled
decay is not L2, accumulation equals one big batch, parameter groups are
independent optimizers, and hyperparameters change at run time without a
recompilation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
from conftest import PROBLEMS, relative_error


def _lockstep(opt, params, grads_seq):
  """Feed the same gradient sequence to ``opt``; return params and updates."""
  @jax.jit
  def step(params, state, g):
    updates, state = opt.update(g, state, params)
    return optax.apply_updates(params, updates), state, updates

  state = opt.init(params)
  all_updates = []
  for g in grads_seq:
    params, state, updates = step(params, state, g)
    all_updates.append(updates)
  return params, all_updates, state


def _random_grads(params, n, seed=0, scales=None):
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    scale = 1.0 if scales is None else scales[i]
    out.append(treedef.unflatten([
        jnp.asarray(scale * rng.normal(size=np.shape(x)), jnp.float32)
        for x in leaves]))
  return out


def test_warmup_cosine_value_is_the_step_length_at_every_step():
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=1e-2, warmup_steps=10, decay_steps=40,
      end_value=1e-4)
  tx = optax.chain(optax.clip_by_global_norm(1.0), jadam.scale_by_adam(),
                   optax.scale_by_learning_rate(schedule))
  params = jnp.zeros(4)
  g = jnp.array([0.3, -0.2, 0.1, -0.05])
  # A constant gradient makes Adam's direction g/|g| exactly, at every step,
  # so each update's size is the schedule's value at that step.
  _, updates, _ = _lockstep(tx, params, [g] * 40)
  sizes = np.array([float(u[0]) for u in updates])
  expected = -np.array([float(schedule(t)) for t in range(40)])
  assert sizes[0] == 0.0   # warm-up starts at zero: the first step is no step
  np.testing.assert_allclose(sizes, expected, rtol=2e-5, atol=1e-10)
  np.testing.assert_allclose(np.array([u[3] for u in updates]), -expected,
                             rtol=2e-5, atol=1e-10)
  assert abs(sizes[10]) == pytest.approx(1e-2, rel=2e-5)  # the peak


def test_clipping_acts_on_the_gradients_the_moments_see():
  params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
  # Gradient norms from 0.1 to 100: clipping to 1 changes the moment history.
  grads = _random_grads(params, 20, scales=np.geomspace(0.1, 100.0, 20))
  clipped = []
  for g in grads:
    norm = float(optax.tree.norm(g))
    clipped.append(jax.tree.map(lambda x: x * min(1.0, 1.0 / norm), g))
  chained, _, _ = _lockstep(
      optax.chain(optax.clip_by_global_norm(1.0), jadam.adam(1e-2)),
      params, grads)
  by_hand, _, _ = _lockstep(jadam.adam(1e-2), params, clipped)
  unclipped, _, _ = _lockstep(jadam.adam(1e-2), params, grads)
  assert relative_error(chained, by_hand) < 1e-6
  assert relative_error(chained, unclipped) > 1e-2  # clipping mattered


def test_full_recipe_matches_optax_step_for_step():
  params, loss = PROBLEMS["mlp"]()
  schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 20, 200, 3e-5)
  decay_mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)  # noqa: E731

  def recipe(scale_by_adam):
    return optax.chain(optax.clip_by_global_norm(0.5), scale_by_adam(b2=0.98),
                       optax.add_decayed_weights(1e-2, decay_mask),
                       optax.scale_by_learning_rate(schedule))

  grads = [jax.grad(loss)(params)] + _random_grads(params, 199, seed=3)
  ours, _, _ = _lockstep(recipe(jadam.scale_by_adam), params, grads)
  theirs, _, _ = _lockstep(recipe(optax.scale_by_adam), params, grads)
  assert relative_error(ours, theirs) < 1e-6


def test_decayed_weights_after_adam_are_decoupled_not_l2():
  params = jnp.array([2.0, -0.5])
  zero = jnp.zeros(2)
  decoupled = optax.chain(jadam.scale_by_adam(), optax.add_decayed_weights(0.1),
                          optax.scale_by_learning_rate(0.01))
  l2 = optax.chain(optax.add_decayed_weights(0.1), jadam.scale_by_adam(),
                   optax.scale_by_learning_rate(0.01))
  _, (u_decoupled,), _ = _lockstep(decoupled, params, [zero])
  _, (u_l2,), _ = _lockstep(l2, params, [zero])
  # Decoupled (AdamW): −α·λ·θ, proportional to the weight.
  np.testing.assert_allclose(u_decoupled, [-0.002, 0.0005], rtol=1e-6)
  # L2 through Adam: the decay term is normalised like a gradient, so every
  # weight moves by about α whatever its size.
  np.testing.assert_allclose(u_l2, [-0.01, 0.01], rtol=1e-5)
  # jadam.adamw is the decoupled recipe.
  _, (u_adamw,), _ = _lockstep(jadam.adamw(0.01, weight_decay=0.1), params,
                               [zero])
  np.testing.assert_array_equal(u_adamw, u_decoupled)


def _linear_regression(n=32, d=5, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  y = jnp.asarray(x @ rng.normal(size=d) + 0.1 * rng.normal(size=n),
                  jnp.float32)
  loss = lambda p, xb, yb: jnp.mean((xb @ p["w"] + p["b"] - yb) ** 2)  # noqa
  return {"w": jnp.zeros(d), "b": jnp.zeros(())}, x, y, loss


def test_multisteps_of_k_microbatches_equals_one_big_batch_step():
  params, x, y, loss = _linear_regression()
  k, big_steps = 4, 6
  micro_x, micro_y = x.reshape(k, -1, x.shape[1]), y.reshape(k, -1)
  accumulate = optax.MultiSteps(jadam.adam(0.2), every_k_schedule=k)
  big = jadam.adam(0.2)
  acc_state, big_state = accumulate.init(params), big.init(params)
  acc_params, big_params = params, params
  grad = jax.jit(jax.grad(loss))
  acc_update, big_update = jax.jit(accumulate.update), jax.jit(big.update)
  for _ in range(big_steps):
    start = acc_params
    for i in range(k):
      g = grad(acc_params, micro_x[i], micro_y[i])
      updates, acc_state = acc_update(g, acc_state, acc_params)
      acc_params = optax.apply_updates(acc_params, updates)
      if i < k - 1:  # no movement until the k-th micro-batch
        assert relative_error(acc_params, start) == 0.0
    # The mean of k equal-sized micro-batch means is the big batch's mean, up
    # to the order of the float32 sums (which Adam's normalisation keeps at
    # a few ulps of the step).
    g = grad(big_params, x, y)
    updates, big_state = big_update(g, big_state, big_params)
    big_params = optax.apply_updates(big_params, updates)
    assert relative_error(acc_params, big_params) < 2e-5
  assert int(acc_state.inner_opt_state[0].count) == big_steps
  assert loss(big_params, x, y) < 0.5 * loss(params, x, y)


def test_partition_groups_are_independent_optimizers():
  params = {"embed": jnp.ones((4, 3)), "head": {"w": jnp.ones((3, 2)),
                                                "b": jnp.ones(2)},
            "frozen": jnp.ones(5)}
  labels = {"embed": "embed", "head": {"w": "head", "b": "head"},
            "frozen": "frozen"}
  groups = {
      "embed": jadam.adam(optax.linear_schedule(1e-3, 1e-2, 10)),
      "head": jadam.adamw(3e-3, weight_decay=0.1,
                          mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
      "frozen": optax.set_to_zero(),
  }
  opt = optax.partition(groups, labels)
  grads = _random_grads(params, 15, seed=7)
  final, _, state = _lockstep(opt, params, grads)
  np.testing.assert_array_equal(final["frozen"], params["frozen"])
  # Each group is exactly its optimizer run alone on its sub-tree.
  alone_embed, _, _ = _lockstep(groups["embed"], params["embed"],
                                [g["embed"] for g in grads])
  alone_head, _, _ = _lockstep(groups["head"], params["head"],
                               [g["head"] for g in grads])
  assert relative_error(final["embed"], alone_embed) < 1e-7
  assert relative_error(final["head"], alone_head) < 1e-7
  # The frozen group keeps no Adam moments.
  frozen_state = state.inner_states["frozen"].inner_state
  assert not jax.tree.leaves(frozen_state)


def test_inject_hyperparams_runtime_changes_equal_fresh_optimizers():
  opt = optax.inject_hyperparams(jadam.adamw)(
      learning_rate=1e-2, b1=0.9, b2=0.999, weight_decay=0.0)
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  grads = _random_grads(params, 12, seed=11)
  state = opt.init(params)
  update = jax.jit(opt.update)
  changes = [(4, "learning_rate", 3e-3), (6, "b1", 0.5), (8, "b2", 0.9),
             (10, "weight_decay", 0.05)]
  reference = {"learning_rate": 1e-2, "b1": 0.9, "b2": 0.999,
               "weight_decay": 0.0}
  ref_params, ref_state = params, None
  p = params
  for t, g in enumerate(grads):
    for when, name, value in changes:
      if t == when:
        state.hyperparams[name] = jnp.asarray(value, jnp.float32)
        reference[name] = value
    updates, state = update(g, state, p)
    p = optax.apply_updates(p, updates)
    # A fresh jadam.adamw with today's values, carrying yesterday's moments,
    # takes the same step: the injected values are the ones used.
    fresh = jadam.adamw(**reference)
    if ref_state is None:
      ref_state = fresh.init(params)
    ref_updates, ref_state = fresh.update(g, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, ref_updates)
    assert relative_error(p, ref_params) < 1e-6, (t, reference)
  assert update._cache_size() == 1  # four changes, one compilation


def test_inject_hyperparams_with_a_schedule_records_the_rate_used():
  schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 5, 20)
  opt = optax.inject_hyperparams(jadam.adam)(learning_rate=schedule)
  params = jnp.zeros(3)
  state = opt.init(params)
  update = jax.jit(opt.update)
  g = jnp.array([1.0, -1.0, 0.5])
  for t in range(20):
    updates, state = update(g, state, params)
    # The state reports the value the step used, and the step has that size.
    used = float(state.hyperparams["learning_rate"])
    assert used == pytest.approx(float(schedule(t)), rel=1e-5, abs=1e-12)
    np.testing.assert_allclose(updates, -used * np.sign(g), rtol=2e-5,
                               atol=1e-12)
  assert update._cache_size() == 1


def test_an_optax_adam_state_continues_under_jadam():
  params, loss = PROBLEMS["quadratic"]()
  grads = _random_grads(params, 20, seed=5)
  _, _, optax_state = _lockstep(optax.adam(1e-2), params, grads[:10])
  mid, _, _ = _lockstep(optax.adam(1e-2), params, grads[:10])
  # Same leaves in the same order: convert by re-labelling the tree.
  template = jadam.adam(1e-2).init(params)
  converted = jax.tree.unflatten(jax.tree.structure(template),
                                 jax.tree.leaves(optax_state))
  assert isinstance(converted[0], jadam.ScaleByAdamState)
  assert int(converted[0].count) == 10
  opt = jadam.adam(1e-2)

  @jax.jit
  def step(params, state, g):
    updates, state = opt.update(g, state, params)
    return optax.apply_updates(params, updates), state

  ours, state = mid, converted
  for g in grads[10:]:
    ours, state = step(ours, state, g)
  theirs, _, _ = _lockstep(optax.adam(1e-2), params, grads)
  assert relative_error(ours, theirs) < 1e-6

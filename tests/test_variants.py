"""Cautious, ADOPT, AdEMAMix and schedule-free AdamW, each pinned to a reference.

* ADOPT, AdEMAMix, schedule-free AdamW: ``optax.contrib``'s versions, in
  lockstep (both fed the same gradients every step; every update, or for
  schedule-free every iterate, agrees to 1e-6 relative).
* Cautious: a float64 NumPy transcription of C-AdamW (Liang et al., 2024,
  Algorithm 1 with the normalisation of the authors' reference code).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
from conftest import PROBLEMS, relative_error, train

STEPS = 200


@pytest.fixture(params=sorted(PROBLEMS))
def problem(request):
  return PROBLEMS[request.param]()


def _leaves(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64))
                         for x in jax.tree.leaves(tree)])


def _lockstep(ours, theirs, params, loss, steps=STEPS):
  """Run both on the same gradients; yield (ours, theirs) per step.

  The parameters follow ``theirs``. Each step yields the two new parameter
  trees, the two updates and the two states.
  """
  @jax.jit
  def step(params, our_state, their_state):
    grads = jax.grad(loss)(params)
    our_updates, our_state = ours.update(grads, our_state, params)
    their_updates, their_state = theirs.update(grads, their_state, params)
    return (params, optax.apply_updates(params, our_updates),
            optax.apply_updates(params, their_updates), our_updates,
            their_updates, our_state, their_state)

  our_state, their_state = ours.init(params), theirs.init(params)
  for _ in range(steps):
    (old, new_ours, new_theirs, our_updates, their_updates, our_state,
     their_state) = step(params, our_state, their_state)
    yield old, new_ours, new_theirs, our_updates, their_updates, our_state, their_state
    params = new_theirs


# --------------------------------------------------------------------------
# ADOPT and AdEMAMix: every update equals optax.contrib's.
# --------------------------------------------------------------------------

CONTRIB = {
    "adopt": (lambda: jadam.contrib.adopt(1e-2),
              lambda: optax.contrib.adopt(1e-2)),
    "adopt_nesterov": (lambda: jadam.contrib.adopt(1e-2, nesterov=True),
                       lambda: optax.contrib.adopt(1e-2, nesterov=True)),
    "adopt_unclipped_b2": (
        lambda: jadam.contrib.adopt(3e-3, b2=0.5, use_clipping=False),
        lambda: optax.contrib.adopt(3e-3, b2=0.5, use_clipping=False)),
    "ademamix": (lambda: jadam.contrib.ademamix(1e-2, b3=0.999),
                 lambda: optax.contrib.ademamix(1e-2, b3=0.999)),
    "ademamix_decay": (
        lambda: jadam.contrib.ademamix(1e-2, b3=0.999, weight_decay=0.01,
                               eps_root=1e-10),
        lambda: optax.contrib.ademamix(1e-2, b3=0.999, weight_decay=0.01,
                                       eps_root=1e-10)),
    # The paper warms α and β3 up; schedules are functions of the count.
    "ademamix_schedules": (
        lambda: jadam.contrib.ademamix(1e-2, alpha=optax.linear_schedule(0., 5., 100),
                               b3=optax.linear_schedule(0.9, 0.999, 100)),
        lambda: optax.contrib.ademamix(
            1e-2, alpha=optax.linear_schedule(0., 5., 100),
            b3=optax.linear_schedule(0.9, 0.999, 100))),
    "ademamix_paper_warmup": (
        lambda: jadam.contrib.ademamix(1e-2, alpha=optax.linear_schedule(0., 5., 100),
                               b3=jadam.contrib.ademamix_b3_schedule(0.9999, 100)),
        lambda: optax.contrib.ademamix(
            1e-2, alpha=optax.linear_schedule(0., 5., 100),
            b3=jadam.contrib.ademamix_b3_schedule(0.9999, 100))),
}


@pytest.mark.parametrize("variant", sorted(CONTRIB))
def test_every_update_matches_optax_contrib(variant, problem):
  params, loss = problem
  ours, theirs = (make() for make in CONTRIB[variant])
  worst, nonzero = 0.0, 0
  for _, _, _, a, b, _, _ in _lockstep(ours, theirs, params, loss):
    if np.any(_leaves(b)):
      nonzero += 1
      worst = max(worst, relative_error(a, b))
    else:  # ADOPT's first update is zero: ours must be zero too
      assert not np.any(_leaves(a))
  assert nonzero >= STEPS - 1
  assert worst < 1e-6


@pytest.mark.parametrize("variant", ["adopt", "ademamix"])
def test_free_running_training_matches_optax_contrib(variant):
  params, loss = PROBLEMS["quadratic"]()
  ours, theirs = (make() for make in CONTRIB[variant])
  a, _ = train(ours, params, loss, STEPS)
  b, _ = train(theirs, params, loss, STEPS)
  assert relative_error(a, b) < 1e-6
  assert loss(a) < 0.5 * loss(params)


@pytest.mark.parametrize("variant", sorted(CONTRIB))
def test_state_is_optax_contrib_state_and_continues_it(variant):
  # jadam's ADOPT and AdEMAMix states are optax.contrib's (same classes and
  # fields, count_m2 included): an optax checkpoint continues under jadam.
  params, loss = PROBLEMS["quadratic"]()
  ours, theirs = (make() for make in CONTRIB[variant])
  assert (jax.tree.structure(ours.init(params))
          == jax.tree.structure(theirs.init(params)))
  mid, state = train(theirs, params, loss, 10)
  state_a = state_b = state
  a = b = mid
  step = lambda tx: jax.jit(lambda p, s: (lambda u, s: (
      optax.apply_updates(p, u), s))(*tx.update(jax.grad(loss)(p), s, p)))
  step_a, step_b = step(ours), step(theirs)
  for _ in range(10):
    a, state_a = step_a(a, state_a)
    b, state_b = step_b(b, state_b)
  assert relative_error(a, b) < 1e-6
  assert relative_error(state_a, state_b) < 1e-6


def test_ademamix_b3_schedule_grows_the_half_life_linearly():
  """The paper's f_β3, transcribed in float64: h(β) = ln ½ / ln β."""
  b3, b_start, warmup = 0.9999, 0.9, 500
  schedule = jadam.contrib.ademamix_b3_schedule(b3, warmup, b_start)
  half_life = lambda beta: np.log(0.5) / np.log(beta)
  steps = np.arange(0, warmup + 20)
  got = np.array([float(schedule(t)) for t in steps])
  fraction = np.minimum(steps / warmup, 1.0)
  expected = 0.5 ** (1 / ((1 - fraction) * half_life(b_start)
                          + fraction * half_life(b3)))
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert got[0] == pytest.approx(b_start) and got[-1] == pytest.approx(b3)
  assert np.all(np.diff(got) >= 0)
  # Half-way through the warmup the half-life is half-way, ~3470 steps,
  # where a linear ramp of β3 itself would give ~13.
  assert half_life(got[warmup // 2]) == pytest.approx(
      (half_life(b_start) + half_life(b3)) / 2, rel=1e-3)


def test_adopt_first_update_only_measures_the_second_moment():
  tx = jadam.contrib.scale_by_adopt()
  g = {"w": jnp.array([3.0, -4.0])}
  state = tx.init(g)
  out, state = tx.update(g, state)
  np.testing.assert_array_equal(out["w"], [0.0, 0.0])
  np.testing.assert_array_equal(state.mu["w"], [0.0, 0.0])
  np.testing.assert_array_equal(state.nu["w"], [9.0, 16.0])  # v_0 = g_0²
  # Second step: m_1 = (1 − β1)·clip(g_1/√v_0, 1^¼ = 1).
  out, state = tx.update({"w": jnp.array([1.5, -8.0])}, state)
  np.testing.assert_allclose(out["w"], [0.1 * 0.5, 0.1 * -1.0], rtol=1e-6)


# --------------------------------------------------------------------------
# Schedule-free AdamW.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {"learning_rate": 1e-2, "warmup_steps": 20},
    {"learning_rate": 3e-3, "b1": 0.95, "weight_decay": 0.01},
], ids=["warmup", "decay"])
def test_schedule_free_adamw_matches_optax_contrib(kwargs, problem):
  """y (trained), z and x (evaluated) all agree with optax's, every step.

  The updates themselves are differences y_{t+1} − y_t of nearly equal
  numbers, so they are compared through the iterates they produce.
  """
  params, loss = problem
  ours = jadam.contrib.schedule_free_adamw(**kwargs)
  theirs = optax.contrib.schedule_free_adamw(**kwargs)
  worst = 0.0
  for _, y_ours, y_theirs, _, _, s_ours, s_theirs in _lockstep(
      ours, theirs, params, loss):
    x_ours = jadam.contrib.schedule_free_eval_params(s_ours, y_ours)
    x_theirs = optax.contrib.schedule_free_eval_params(s_theirs, y_theirs)
    worst = max(worst, relative_error(y_ours, y_theirs),
                relative_error(s_ours.z, s_theirs.z),
                relative_error(x_ours, x_theirs))
  assert worst < 1e-6


def test_schedule_free_base_step_stores_no_first_moment():
  state = jadam.contrib.schedule_free_adamw().init({"w": jnp.ones(5)})
  base = state.base_optimizer_state[0]
  assert isinstance(base, jadam.contrib.ScaleBySecondMomentState)
  assert base._fields == ("count", "nu")
  # int8 storage keeps the same class and fields: the √v codes and their
  # block scales sit in one jadam.Int8Moment leaf where the float nu would.
  int8 = jadam.contrib.schedule_free_adamw(nu_dtype="int8").init({"w": jnp.ones(8192)})
  base = int8.base_optimizer_state[0]
  assert isinstance(base, jadam.contrib.ScaleBySecondMomentState)
  assert base._fields == ("count", "nu")
  assert isinstance(base.nu["w"], jadam.Int8Moment)
  assert base.nu["w"].codes.dtype == jnp.uint8
  assert base.nu["w"].codes.shape == (8192,)
  assert base.nu["w"].scales.shape == (32,)


def test_schedule_free_state_is_optax_state_and_continues_it():
  # The same tree as optax.contrib.schedule_free_adamw's state: an optax
  # checkpoint continues under jadam.
  params, loss = PROBLEMS["quadratic"]()
  ours = jadam.contrib.schedule_free_adamw(1e-2, warmup_steps=5)
  theirs = optax.contrib.schedule_free_adamw(1e-2, warmup_steps=5)
  assert (jax.tree.structure(ours.init(params))
          == jax.tree.structure(theirs.init(params)))
  mid, state = train(theirs, params, loss, 10)
  a, state_a = mid, state
  b, state_b = mid, state
  for tx, which in ((ours, "a"), (theirs, "b")):
    step = jax.jit(lambda p, s, tx=tx: (lambda u, s: (
        optax.apply_updates(p, u), s))(*tx.update(jax.grad(loss)(p), s, p)))
    p, s = mid, state
    for _ in range(10):
      p, s = step(p, s)
    if which == "a":
      a, state_a = p, s
    else:
      b, state_b = p, s
  assert relative_error(a, b) < 1e-6
  assert relative_error(state_a, state_b) < 1e-6


def test_schedule_free_eval_params_finds_the_state_inside_a_chain():
  params, loss = PROBLEMS["quadratic"]()
  opt = optax.chain(optax.clip_by_global_norm(10.0),
                    jadam.contrib.schedule_free_adamw(5e-2))
  y, state = train(opt, params, loss, 100)
  x = jadam.contrib.schedule_free_eval_params(state, y)
  sf_state = state[1]
  expected = jax.tree.map(lambda yi, zi: (yi - 0.1 * zi) / 0.9, y, sf_state.z)
  assert relative_error(x, expected) < 1e-6
  # x is the average of z: it moved, and evaluating there beats the start.
  assert loss(x) < 0.5 * loss(params)


def test_schedule_free_eval_params_rejects_other_states():
  params = {"w": jnp.ones(2)}
  with pytest.raises(ValueError, match="exactly one schedule-free state"):
    jadam.contrib.schedule_free_eval_params(jadam.adam(1e-3).init(params), params)


# --------------------------------------------------------------------------
# Cautious.
# --------------------------------------------------------------------------


class _NumpyCautiousAdamW:
  """C-AdamW in float64, transcribed from Liang et al. (2024), Algorithm 1.

  The step u = m̂/(√v̂ + ε) is masked by φ = [u·g > 0] and divided by
  max(mean(φ), 1e-3), per tensor, as in the authors' reference code.
  """

  def __init__(self, lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0):
    self.lr, self.b1, self.b2, self.eps, self.wd = lr, b1, b2, eps, weight_decay
    self.m = self.v = None
    self.t = 0
    self.dropped = 0  # components the mask has zeroed so far

  def update(self, grads, params):
    grads = [np.asarray(g, np.float64) for g in grads]
    params = [np.asarray(p, np.float64) for p in params]
    if self.m is None:
      self.m = [np.zeros_like(g) for g in grads]
      self.v = [np.zeros_like(g) for g in grads]
    self.t += 1
    updates = []
    for i, (g, p) in enumerate(zip(grads, params)):
      self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
      self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g * g
      m_hat = self.m[i] / (1 - self.b1**self.t)
      v_hat = self.v[i] / (1 - self.b2**self.t)
      u = m_hat / (np.sqrt(v_hat) + self.eps)
      phi = (u * g > 0).astype(np.float64)
      self.dropped += int(np.sum((phi == 0) & (g != 0)))
      u = u * phi / max(phi.mean(), 1e-3)
      updates.append(-self.lr * (u + self.wd * p))
    return updates


@pytest.mark.parametrize("weight_decay", [None, 0.01])
def test_cautious_adamw_matches_numpy_transcription(weight_decay, problem):
  """In float64, where float32's rounding of 1 − β2^t does not blur it."""
  with jax.enable_x64(True):
    params, loss = problem
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
    if weight_decay is None:
      ours = jadam.adam(1e-2, cautious=True)
    else:
      ours = jadam.adamw(1e-2, weight_decay=weight_decay, cautious=True)
    reference = _NumpyCautiousAdamW(1e-2, weight_decay=weight_decay or 0.0)
    state = ours.init(params)

    @jax.jit
    def step(params, state):
      grads = jax.grad(loss)(params)
      updates, state = ours.update(grads, state, params)
      return grads, updates, state

    worst = 0.0
    for _ in range(STEPS):
      grads, updates, state = step(params, state)
      expected = reference.update(jax.tree.leaves(grads),
                                  jax.tree.leaves(params))
      worst = max(worst, relative_error(jax.tree.leaves(updates), expected))
      params = optax.apply_updates(params, updates)
  assert worst < 1e-10
  assert reference.dropped > 0  # the mask did drop components on the way


def test_cautious_zeroes_disagreeing_components_and_rescales_the_rest():
  tx = jadam.scale_by_adam(cautious=True)
  state = tx.init({"w": jnp.zeros(4)})
  # Step 1: m̂ = g, so every component agrees and nothing changes.
  g1 = jnp.array([1.0, -1.0, 2.0, -2.0])
  out, state = tx.update({"w": g1}, state)
  plain, _ = jadam.scale_by_adam().update(
      {"w": g1}, jadam.scale_by_adam().init({"w": jnp.zeros(4)}))
  np.testing.assert_allclose(out["w"], plain["w"], rtol=1e-7)
  # Step 2: small gradients of the opposite sign on the first two components
  # leave m̂ unchanged in sign there, so the direction disagrees with g.
  g2 = jnp.array([-0.1, 0.1, 2.0, -2.0])
  out, _ = tx.update({"w": g2}, state)
  plain_state = jadam.scale_by_adam().init({"w": jnp.zeros(4)})
  _, plain_state = jadam.scale_by_adam().update({"w": g1}, plain_state)
  plain, _ = jadam.scale_by_adam().update({"w": g2}, plain_state)
  np.testing.assert_array_equal(out["w"][:2], [0.0, 0.0])
  # Half the components kept: the rest are doubled.
  np.testing.assert_allclose(out["w"][2:], 2 * plain["w"][2:], rtol=1e-6)


def test_cautious_fraction_is_per_tensor():
  tx = jadam.scale_by_adam(cautious=True)
  params = {"a": jnp.zeros(4), "b": jnp.zeros(2)}
  state = tx.init(params)
  _, state = tx.update({"a": jnp.ones(4), "b": jnp.ones(2)}, state)
  # "a": one of four components reverses; "b": none does.
  out, _ = tx.update({"a": jnp.array([-0.1, 1., 1., 1.]), "b": jnp.ones(2)},
                     state)
  plain = jadam.scale_by_adam()
  p_state = plain.init(params)
  _, p_state = plain.update({"a": jnp.ones(4), "b": jnp.ones(2)}, p_state)
  ref, _ = plain.update({"a": jnp.array([-0.1, 1., 1., 1.]),
                         "b": jnp.ones(2)}, p_state)
  np.testing.assert_allclose(out["a"][1:], ref["a"][1:] * 4 / 3, rtol=1e-6)
  np.testing.assert_allclose(out["b"], ref["b"], rtol=1e-6)


def test_cautious_step_is_zero_not_nan_when_every_sign_disagrees():
  tx = jadam.scale_by_adam(cautious=True)
  state = tx.init({"w": jnp.zeros(3)})
  _, state = tx.update({"w": jnp.ones(3)}, state)
  out, _ = tx.update({"w": -0.01 * jnp.ones(3)}, state)
  np.testing.assert_array_equal(out["w"], [0.0, 0.0, 0.0])


@pytest.mark.parametrize("alias", ["nadam", "amsgrad", "adamax", "radam"])
def test_cautious_masks_the_direction_and_leaves_the_moments_alone(alias):
  """For every family member: same moments; direction = plain·φ/mean(φ)."""
  params, loss = PROBLEMS["mlp"]()
  cautious = getattr(jadam, alias)(1e-2, cautious=True)
  plain = getattr(jadam, alias)(1e-2)
  grad_fn = jax.jit(jax.grad(loss))
  kept_fractions = []
  for old, _, _, a, b, s_a, s_b in _lockstep(cautious, plain, params, loss,
                                             steps=60):
    grads = grad_fn(old)
    for ua, ub, g in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                         jax.tree.leaves(grads)):
      # Parameters move by the update: agreement means update·g < 0.
      phi = (np.asarray(ub) * np.asarray(g) < 0).astype(np.float64)
      kept = max(phi.mean(), 1e-3)
      kept_fractions.append(kept)
      np.testing.assert_allclose(ua, np.asarray(ub) * phi / kept,
                                 rtol=2e-6, atol=1e-9)
    assert relative_error(s_a[0].mu, s_b[0].mu) == 0.0
  assert min(kept_fractions) < 1.0


# --------------------------------------------------------------------------
# The fast path and compressed moments.
# --------------------------------------------------------------------------

ELEMENTWISE = {
    "adopt": lambda **kw: jadam.contrib.adopt(1e-2, **kw),
    "ademamix": lambda **kw: jadam.contrib.ademamix(1e-2, b3=0.999, **kw),
    "schedule_free_adamw": lambda **kw: jadam.contrib.schedule_free_adamw(
        1e-2, warmup_steps=10, **kw),
}


def _train_flat(opt, params, loss, steps):
  view = jadam.FlatView(params)
  flat, _ = train(opt, view.ravel(params), lambda f: loss(view.unravel(f)),
                  steps)
  return view.unravel(flat)


@pytest.mark.parametrize("variant", sorted(ELEMENTWISE))
def test_variant_on_the_flat_path_takes_the_tree_path_steps(variant):
  params, loss = PROBLEMS["mlp"]()
  tree, _ = train(ELEMENTWISE[variant](), params, loss, 100)
  flat = _train_flat(ELEMENTWISE[variant](), params, loss, 100)
  assert relative_error(flat, tree) < 1e-6


def test_cautious_on_the_flat_path_normalises_per_buffer():
  """One buffer per dtype: the kept fraction is over all its elements.

  For a single-leaf model the two coincide; for several leaves the flat
  path's fraction is the element-weighted mean of the per-leaf ones, a
  different (documented) normalisation, so the runs differ.
  """
  params, loss = PROBLEMS["rosenbrock"]()  # one leaf
  tree, _ = train(jadam.adam(1e-2, cautious=True), params, loss, 100)
  flat = _train_flat(jadam.adam(1e-2, cautious=True), params, loss, 100)
  assert relative_error(flat, tree) < 1e-6
  params, loss = PROBLEMS["mlp"]()  # four leaves, one buffer
  tree, _ = train(jadam.adam(1e-2, cautious=True), params, loss, 100)
  flat = _train_flat(jadam.adam(1e-2, cautious=True), params, loss, 100)
  assert relative_error(flat, tree) > 1e-4
  assert loss(flat) < 0.5 * loss(params)


@pytest.mark.parametrize("variant", sorted(ELEMENTWISE))
@pytest.mark.parametrize("storage", [
    {"nu_dtype": jadam.BlockwiseInt8(block_size=4, min_size=0)},
    {"nu_dtype": "bfloat16"}], ids=["int8", "bf16"])
def test_variant_with_compressed_second_moment_trains_like_float32(
    variant, storage):
  params, loss = PROBLEMS["quadratic"]()
  full, _ = train(ELEMENTWISE[variant](), params, loss, 200)
  small, state = train(ELEMENTWISE[variant](**storage), params, loss, 200)
  # The moments really are stored compressed.
  stored = [leaf.dtype for leaf in jax.tree.leaves(state)
            if getattr(leaf, "ndim", 0) > 0]
  wanted = jnp.bfloat16 if storage["nu_dtype"] == "bfloat16" else jnp.uint8
  assert wanted in stored
  assert loss(small) < 0.5 * loss(params)
  # Not converged after 200 steps, so the endpoints differ; the compressed
  # run must not be materially worse.
  assert float(loss(small)) < 1.25 * float(loss(full))


def test_variant_first_moments_can_be_int8():
  params, loss = PROBLEMS["quadratic"]()
  full, _ = train(jadam.contrib.ademamix(1e-2, b3=0.999), params, loss, 200)
  int8 = jadam.BlockwiseInt8(block_size=4, min_size=0)
  small, state = train(jadam.contrib.ademamix(1e-2, b3=0.999, mu_dtype=int8,
                                      nu_dtype=int8), params, loss, 200)
  assert jnp.int8 in [leaf.dtype for leaf in jax.tree.leaves(state[0].m2)]
  assert loss(small) < 0.5 * loss(params)
  assert float(loss(small)) < 1.25 * float(loss(full))


def test_variants_study_example_trains_every_variant():
  """examples/variants_study.py, shortened: 2 epochs of logistic regression."""
  import pathlib  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  examples = pathlib.Path(__file__).resolve().parent.parent / "examples"
  sys.path.insert(0, str(examples))
  try:
    import variants_study  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.remove(str(examples))
  results = variants_study.run_variants(
      "logreg", variants_study.LEARNING_RATES["logreg"], epochs=2, seeds=(0,),
      verbose=False)
  assert list(results) == list(variants_study.VARIANTS)
  for name, result in results.items():
    assert result.epoch_loss.shape == (1, 2)
    assert result.test_accuracy[0] > 0.85, name
  table = variants_study.format_table("logreg", results)
  assert table.count("\n") == len(results) + 1


# --------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("make,name", [
    (lambda: jadam.contrib.ademamix(1e-3, b3=1.0), "b3"),
    (lambda: jadam.contrib.ademamix(1e-3, alpha=-1.0), "alpha"),
    (lambda: jadam.contrib.adopt(1e-3, b2=1.5), "b2"),
    (lambda: jadam.contrib.schedule_free_adamw(1e-3, b1=0.0), "b1"),
    (lambda: jadam.adam(1e-3, numerics="tensorflow"), "numerics"),
    (lambda: jadam.scale_by_adam(nesterov=True, numerics="keras"), "keras"),
    (lambda: jadam._transform.scale_by_rule(  # pylint: disable=protected-access
        jadam.rule.AdamRule(infinity_norm=True, numerics="keras"), None, None),
     "keras"),
    (lambda: jadam.contrib.adopt(1e-3, mu_dtype="int32"), "mu_dtype"),
    (lambda: jadam.contrib.ademamix_b3_schedule(0.999, 100, b_start=0.9999),
     "b_start"),
    (lambda: jadam.contrib.ademamix_b3_schedule(0.999, 0), "warmup_steps"),
])
def test_bad_hyperparameters_are_named(make, name):
  with pytest.raises(ValueError, match=name):
    make()


def test_schedule_free_adamw_under_inject_hyperparams_and_jit():
  # b1 is a traced value there; construction must not call float() on it.
  params, loss = PROBLEMS["quadratic"]()
  ours = optax.inject_hyperparams(jadam.contrib.schedule_free_adamw)(
      learning_rate=1e-2, b1=0.9)
  theirs = optax.inject_hyperparams(optax.contrib.schedule_free_adamw)(
      learning_rate=1e-2, b1=0.9)
  a, _ = train(ours, params, loss, 20)
  b, _ = train(theirs, params, loss, 20)
  assert relative_error(a, b) < 1e-6


def test_schedule_free_adamw_takes_a_schedule_with_warmup():
  # The warmup ramps the schedule's value linearly from 0.
  schedule = optax.exponential_decay(1e-2, 10, 0.5)
  params, loss = PROBLEMS["quadratic"]()
  warmed, _ = train(jadam.contrib.schedule_free_adamw(schedule, warmup_steps=5),
                    params, loss, 30)
  ramped = lambda count: jnp.minimum(count / 5, 1.0) * schedule(count)
  by_hand, _ = train(jadam.contrib.schedule_free_adamw(ramped), params, loss, 30)
  assert relative_error(warmed, by_hand) < 1e-6
  assert loss(warmed) < loss(params)

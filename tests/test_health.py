"""skip_nonfinite drops bad steps exactly; telemetry reports the right numbers."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam

ALIASES = ["adam", "adamw", "nadam", "nadamw", "amsgrad", "adamax", "adamaxw",
           "radam"]
BAD_VALUES = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf}


def _params():
  return {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3),
          "b": jnp.array([0.5, -0.25]), "s": jnp.asarray(2.0)}


def _grads(step):
  """Deterministic, step-dependent finite gradients with _params' structure."""
  return jax.tree.map(
      lambda p: jnp.cos(3.0 * p + step) * (1.0 + 0.1 * step), _params())


def _poison(grads, value):
  return {**grads, "b": grads["b"].at[1].set(value)}


def _bitwise_equal(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  return all(x.dtype == y.dtype and np.array_equal(np.asarray(x),
                                                   np.asarray(y))
             for x, y in zip(leaves_a, leaves_b))


def _stepper(opt):
  """One jitted (params, state, grads) -> (params, state) step of ``opt``."""
  @jax.jit
  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def _run(opt, grads_per_step, step=None):
  step = step or _stepper(opt)
  params = _params()
  state = opt.init(params)
  for grads in grads_per_step:
    params, state = step(params, state, grads)
  return params, state


def _one_step(opt, params, state, grads):
  updates, state = jax.jit(opt.update)(grads, state, params)
  return optax.apply_updates(params, updates), state


# ---------------------------------------------------------------------------
# skip_nonfinite


@pytest.mark.parametrize("name", ALIASES)
def test_bad_step_leaves_params_and_whole_inner_state_bitwise(name):
  opt = jadam.skip_nonfinite(getattr(jadam, name)(0.05))
  step = _stepper(opt)
  params, state = _run(opt, [_grads(t) for t in range(3)], step)
  for skipped, bad in enumerate(BAD_VALUES.values(), start=1):
    new_params, new_state = step(params, state, _poison(_grads(3), bad))
    assert _bitwise_equal(new_params, params)
    assert _bitwise_equal(new_state.inner_state, state.inner_state)
    assert int(new_state.skipped) == skipped
    state = new_state


@pytest.mark.parametrize("name", ALIASES)
def test_skipping_a_step_equals_never_seeing_it(name):
  # 8 steps with NaN/Inf at steps 2 and 5 end bitwise where the 6 finite steps
  # alone end: nothing of the bad steps leaks into moments or step count.
  stream = [_grads(t) for t in range(8)]
  poisoned = list(stream)
  poisoned[2] = _poison(stream[2], np.nan)
  poisoned[5] = _poison(stream[5], np.inf)
  clean = [g for t, g in enumerate(stream) if t not in (2, 5)]
  opt = jadam.skip_nonfinite(getattr(jadam, name)(0.05))
  step = _stepper(opt)
  expected, expected_state = _run(opt, clean, step)
  got, got_state = _run(opt, poisoned, step)
  assert _bitwise_equal(got, expected)
  assert _bitwise_equal(got_state.inner_state, expected_state.inner_state)
  assert int(got_state.skipped) == 2 and int(expected_state.skipped) == 0


def _assert_close(a, b, rtol=1e-6):
  # Relative to each array's scale: an element that passes near zero (JAX
  # 0.12.1: 0.00055 after 10 steps, off by 1.6e-8 from a rounding made
  # elsewhere) says nothing about rounding relative to its own value.
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    y = np.asarray(y, np.float64)
    np.testing.assert_allclose(np.asarray(x, np.float64), y, rtol=rtol,
                               atol=rtol * float(np.max(np.abs(y), initial=0)))


@pytest.mark.parametrize("name", ["adamw", "amsgrad", "radam"])
def test_finite_steps_equal_the_unwrapped_optimizer(name):
  # Equal up to rounding, not bitwise: XLA compiles the update inside a
  # conditional and may fuse (and so round) it differently.
  stream = [_grads(t) for t in range(10)]
  expected, expected_state = _run(getattr(jadam, name)(0.03), stream)
  got, got_state = _run(jadam.skip_nonfinite(getattr(jadam, name)(0.03)),
                        stream)
  _assert_close(got, expected)
  _assert_close(got_state.inner_state, expected_state)
  assert int(got_state.skipped) == 0


def test_skip_inside_chain_after_clipping_and_schedule():
  # NaN passes through clip_by_global_norm (the norm is NaN), so the wrapper
  # sits after it; the schedule's count lives outside and keeps running.
  opt = optax.chain(
      optax.clip_by_global_norm(1.0),
      jadam.skip_nonfinite(jadam.scale_by_adam()),
      optax.scale_by_learning_rate(optax.linear_schedule(0.1, 0.0, 10)))
  params, state = _run(opt, [_grads(0), _poison(_grads(1), np.nan)])
  reference, _ = _run(optax.chain(
      optax.clip_by_global_norm(1.0), jadam.scale_by_adam(),
      optax.scale_by_learning_rate(optax.linear_schedule(0.1, 0.0, 10))),
      [_grads(0)])
  assert _bitwise_equal(params, reference)
  assert int(state[1].skipped) == 1
  assert int(state[1].inner_state.count) == 1


def test_skip_wraps_inject_hyperparams_and_multisteps():
  inject = jadam.skip_nonfinite(
      optax.inject_hyperparams(jadam.adam)(learning_rate=0.1))
  params, state = _run(inject, [_poison(_grads(0), np.inf), _grads(1)])
  assert int(state.skipped) == 1
  assert int(state.inner_state.inner_state[0].count) == 1
  accumulate = optax.MultiSteps(jadam.skip_nonfinite(jadam.adam(0.1)), 2)
  _, state = _run(accumulate, [_grads(0), _poison(_grads(1), np.nan)])
  # The mean of the two micro-batches is NaN, so the real step is skipped.
  assert int(state.inner_opt_state.skipped) == 1
  assert int(state.inner_opt_state.inner_state[0].count) == 0


def test_skip_count_saturates_at_int32_max():
  opt = jadam.skip_nonfinite(jadam.adam(0.1))
  state = opt.init(_params())
  big = jnp.iinfo(jnp.int32).max
  state = state._replace(skipped=jnp.asarray(big - 1, jnp.int32))
  for _ in range(3):
    _, state = jax.jit(opt.update)(_poison(_grads(0), np.nan), state,
                                   _params())
    assert int(state.skipped) == big


def test_skip_under_vmap_decides_per_example():
  opt = jadam.skip_nonfinite(jadam.adam(0.1))
  grads = jnp.array([[1.0, 2.0], [np.nan, 1.0], [3.0, np.inf]])
  updates, state = jax.vmap(lambda g: opt.update(g, opt.init(jnp.ones(2))))(
      grads)
  np.testing.assert_array_equal(state.skipped, [0, 1, 1])
  np.testing.assert_array_equal(state.inner_state[0].count, [1, 0, 0])
  np.testing.assert_allclose(updates[0], [-0.1, -0.1], rtol=1e-5)
  np.testing.assert_array_equal(updates[1:], 0.0)


def test_all_finite_is_exact_at_the_extremes():
  from jadam._health import all_finite
  huge = jnp.full(8, jnp.finfo(jnp.float32).max)
  assert bool(jax.jit(all_finite)({"a": huge, "b": -huge}))  # no overflow
  assert not bool(jax.jit(all_finite)([huge, jnp.array([0.0, -np.inf])]))
  assert not bool(jax.jit(all_finite)(jnp.array([np.nan], jnp.bfloat16)))
  assert not bool(jax.jit(all_finite)(jnp.array([1 + 1j, complex(0, np.inf)])))
  assert bool(all_finite({"empty": jnp.zeros((0, 3)), "int": jnp.arange(3)}))


# ---------------------------------------------------------------------------
# Telemetry


def test_telemetry_numbers_match_numpy():
  opt = jadam.with_telemetry(jadam.adam(0.1))
  params = _params()
  state = opt.init(params)
  grads = _grads(1)
  updates, state = opt.update(grads, state, params)
  s = jadam.stats(state)
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  g, u, p = flat(grads), flat(updates), flat(params)
  nu = flat(state.inner_state[0].nu)
  np.testing.assert_allclose(s["grad_norm"], np.linalg.norm(g), rtol=1e-6)
  np.testing.assert_allclose(s["grad_max_abs"], np.abs(g).max(), rtol=1e-7)
  np.testing.assert_allclose(s["update_norm"], np.linalg.norm(u), rtol=1e-6)
  np.testing.assert_allclose(s["param_norm"], np.linalg.norm(p), rtol=1e-6)
  np.testing.assert_allclose(s["update_ratio"],
                             np.linalg.norm(u) / np.linalg.norm(p), rtol=1e-6)
  np.testing.assert_allclose(s["nu_min"], nu.min(), rtol=1e-7)
  np.testing.assert_allclose(s["nu_max"], nu.max(), rtol=1e-7)
  assert int(s["step"]) == 1 and int(s["skipped_steps"]) == 0
  # At step 1, v = (1 − β2)·g², so the moments are pinned down exactly.
  np.testing.assert_allclose(s["nu_max"], 0.001 * np.abs(g).max() ** 2,
                             rtol=1e-5)


def test_stats_are_nan_before_the_first_step_and_without_params():
  opt = jadam.with_telemetry(jadam.adam(0.1))
  state = opt.init(_params())
  assert all(np.isnan(float(v)) for k, v in jadam.stats(state).items()
             if k not in ("step", "skipped_steps"))
  _, state = opt.update(_grads(0), state)  # no params given
  s = jadam.stats(state)
  assert np.isnan(float(s["param_norm"])) and np.isnan(float(s["update_ratio"]))
  assert np.isfinite(float(s["grad_norm"])) and np.isfinite(float(s["nu_max"]))


def test_second_moment_is_nan_when_the_optimizer_has_none():
  opt = jadam.with_telemetry(optax.sgd(0.1, momentum=0.9))
  state = opt.init(_params())
  _, state = opt.update(_grads(0), state, _params())
  s = jadam.stats(state)
  assert np.isnan(float(s["nu_min"])) and np.isnan(float(s["nu_max"]))
  assert float(s["update_norm"]) > 0


def test_second_moments_gathered_across_partitioned_optimizers():
  labels = {"w": "adam", "b": "amsgrad", "s": "adam"}
  opt = jadam.with_telemetry(optax.partition(
      {"adam": jadam.adam(0.1), "amsgrad": jadam.amsgrad(0.1)}, labels))
  grads = {"w": jnp.full((2, 3), 0.5), "b": jnp.array([4.0, 3.0]),
           "s": jnp.asarray(0.25)}
  _, state = opt.update(grads, opt.init(_params()), _params())
  s = jadam.stats(state)
  np.testing.assert_allclose(s["nu_min"], 0.001 * 0.25 ** 2, rtol=1e-6)
  np.testing.assert_allclose(s["nu_max"], 0.001 * 4.0 ** 2, rtol=1e-6)


def test_telemetry_records_the_skipped_step():
  opt = jadam.with_telemetry(jadam.skip_nonfinite(jadam.adam(0.1)))
  _, state = _run(opt, [_grads(0), _poison(_grads(1), np.inf)])
  s = jadam.stats(state)
  assert int(s["skipped_steps"]) == 1 and int(s["step"]) == 2
  assert float(s["grad_norm"]) == np.inf and float(s["grad_max_abs"]) == np.inf
  assert float(s["update_norm"]) == 0.0 and float(s["update_ratio"]) == 0.0


def test_stats_found_through_wrappers_in_any_order():
  # Skip outside telemetry: the skipped step leaves the telemetry untouched,
  # and the count is still found in the outer state.
  outer = jadam.skip_nonfinite(jadam.with_telemetry(jadam.adam(0.1)))
  _, state = _run(outer, [_grads(0), _poison(_grads(1), np.nan)])
  s = jadam.stats(state)
  assert int(s["skipped_steps"]) == 1 and int(s["step"]) == 1
  assert np.isfinite(float(s["grad_norm"]))
  # Telemetry deep inside a chain, inside MultiSteps, with apply_if_finite.
  deep = optax.MultiSteps(optax.chain(
      optax.clip(1.0), optax.apply_if_finite(
          jadam.with_telemetry(jadam.adam(0.1)), 3)), 1)
  _, state = _run(deep, [_grads(0), _poison(_grads(1), np.nan)])
  s = jadam.stats(state)
  assert int(s["skipped_steps"]) == 1 and int(s["step"]) == 1


def test_stats_inside_jit():
  opt = jadam.with_telemetry(jadam.adam(0.1))
  _, state = _run(opt, [_grads(0)])
  jitted = jax.jit(jadam.stats)(state)
  assert jitted.keys() == jadam.stats(state).keys()
  assert float(jitted["grad_norm"]) == float(jadam.stats(state)["grad_norm"])


def test_stats_without_telemetry_raises():
  with pytest.raises(ValueError, match="with_telemetry"):
    jadam.stats(jadam.adam(0.1).init(_params()))


@pytest.mark.parametrize("every", [0, -1, 2.5, True])
def test_every_must_be_a_positive_integer(every):
  with pytest.raises(ValueError, match="every"):
    jadam.with_telemetry(jadam.adam(0.1), every=every)


def test_every_measures_steps_one_and_one_plus_k():
  opt = jadam.with_telemetry(jadam.adam(0.1), every=3)
  params = _params()
  state = opt.init(params)
  step = _stepper(opt)
  norms = []
  for t in range(7):
    params, state = step(params, state, _grads(t))
    norms.append(float(jadam.stats(state)["grad_norm"]))
  measured = [float(optax.tree.norm(_grads(t))) for t in (0, 3, 6)]
  np.testing.assert_allclose(norms, [measured[0]] * 3 + [measured[1]] * 3
                             + [measured[2]], rtol=1e-6)


def test_telemetry_is_transparent_to_updates():
  stream = [_grads(t) for t in range(5)]
  expected, expected_state = _run(jadam.nadamw(0.05), stream)
  got, got_state = _run(jadam.with_telemetry(jadam.nadamw(0.05)), stream)
  _assert_close(got, expected)
  _assert_close(got_state.inner_state, expected_state)


def test_wrapped_state_can_be_donated():
  # Every state leaf must own its buffer, or donation fails at run time.
  opt = jadam.with_telemetry(jadam.skip_nonfinite(jadam.adam(0.1)))
  params = _params()
  state = opt.init(params)

  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step, donate_argnums=(0, 1))
  for t in range(2):
    params, state = step(params, state, _grads(t))
  assert int(jadam.stats(state)["step"]) == 2


def test_low_precision_and_empty_leaves():
  params = {"bf16": jnp.ones(4, jnp.bfloat16), "empty": jnp.zeros((0, 2)),
            "f16": jnp.ones(3, jnp.float16)}
  grads = {"bf16": jnp.full(4, 300.0, jnp.bfloat16),
           "empty": jnp.zeros((0, 2)), "f16": jnp.full(3, 400.0, jnp.float16)}
  opt = jadam.with_telemetry(jadam.skip_nonfinite(jadam.adam(0.1)))
  _, state = opt.update(grads, opt.init(params), params)
  s = jadam.stats(state)
  # 4·300² + 3·400² overflows float16 but not the float32 the norms use.
  np.testing.assert_allclose(s["grad_norm"], np.sqrt(4 * 300.0**2 +
                                                     3 * 400.0**2), rtol=1e-6)
  assert s["grad_norm"].dtype == jnp.float32
  assert int(s["skipped_steps"]) == 0


# ---------------------------------------------------------------------------
# The example


def test_telemetry_example_logs_the_poisoned_step(capsys):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent
                         / "examples"))
  import telemetry
  log = telemetry.main(["--steps", "60", "--log-every", "20", "--nan-at",
                        "30", "--batch-size", "32"])
  out = capsys.readouterr().out
  assert "grad_norm" in out and "training accuracy" in out
  by_step = {int(r["step"]): r for r in log}
  assert sorted(by_step) == [20, 30, 40, 60]
  assert by_step[20]["skipped_steps"] == 0 and by_step[60]["skipped_steps"] == 1
  assert np.isnan(by_step[30]["grad_norm"])
  assert np.isfinite(by_step[60]["grad_norm"])
  assert by_step[60]["loss"] < by_step[20]["loss"]


def test_stats_of_a_flax_nnx_optimizer_are_plain_arrays():
  from flax import nnx
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(
      model, jadam.with_telemetry(jadam.skip_nonfinite(jadam.adam(0.1))),
      wrt=nnx.Param)
  grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((4, 3))) ** 2))(model)
  optimizer.update(model, grads)
  s = jadam.stats(optimizer.opt_state)
  assert all(isinstance(v, jax.Array) for v in s.values())
  expected = np.sqrt(sum(float(jnp.sum(g ** 2))
                         for g in jax.tree.leaves(nnx.state(grads))))
  np.testing.assert_allclose(s["grad_norm"], expected, rtol=1e-6)
  assert int(s["step"]) == 1 and int(s["skipped_steps"]) == 0


@pytest.mark.parametrize("storage", [
    "bfloat16", "float16", jadam.BlockwiseInt8(min_size=0, block_size=2)])
@pytest.mark.parametrize("name", ["adam", "amsgrad", "adamax"])
def test_bad_step_leaves_compressed_moments_bitwise(name, storage):
  # Skipped steps run inside the update (unit decays, zero gradient): stored
  # bfloat16, float16 (√v) and int8 moments must come back untouched too.
  opt = jadam.skip_nonfinite(getattr(jadam, name)(0.05, mu_dtype=storage,
                                                  nu_dtype=storage))
  step = _stepper(opt)
  params, state = _run(opt, [_grads(t) for t in range(3)], step)
  new_params, new_state = step(params, state, _poison(_grads(3), np.nan))
  assert _bitwise_equal(new_params, params)
  assert _bitwise_equal(new_state.inner_state, state.inner_state)
  assert int(new_state.skipped) == 1


def test_skip_protects_jadam_state_rebuilt_by_a_wrapper():
  # MultiSteps rebuilds its inner state through lax.cond, so the wrapper
  # cannot tell that the update inside honoured the jadam_skip argument
  # and selects it: still bitwise unchanged.
  opt = jadam.skip_nonfinite(optax.MultiSteps(jadam.adam(0.05), 2))
  step = _stepper(opt)
  params, state = _run(opt, [_grads(t) for t in range(3)], step)
  new_params, new_state = step(params, state, _poison(_grads(3), np.inf))
  assert _bitwise_equal(new_params, params)
  assert _bitwise_equal(new_state.inner_state, state.inner_state)


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "float16", "int8"])
def test_second_moment_range_equals_the_decoded_moments(storage):
  # Telemetry's range of v must be exactly that of the decoded moments, in
  # every storage format: row blocks (64 × 32), whole blocks of a flat leaf
  # (8192), a short last block (5000), and a gradient whose square
  # overflows (v = +inf, its own int8 code).
  rng = np.random.default_rng(3)
  params = {"rows": jnp.zeros((64, 32)), "flat": jnp.zeros(8192),
            "odd": jnp.zeros(5000)}
  opt = jadam.with_telemetry(jadam.adam(0.1, mu_dtype=storage,
                                        nu_dtype=storage))
  state = opt.init(params)
  step = jax.jit(opt.update)
  for k in range(3):
    grads = {name: jnp.asarray(rng.standard_normal(p.shape)
                               * 10.0 ** rng.uniform(-4, 1, p.shape),
                               jnp.float32) for name, p in params.items()}
    if k == 2:
      grads["flat"] = grads["flat"].at[7].set(1e20)
    _, state = step(grads, state, params)
  nu = jadam.decode_moments(state.inner_state[0]).nu
  decoded = np.concatenate([np.ravel(x) for x in jax.tree.leaves(nu)])
  s = jadam.stats(state)
  assert float(s["nu_min"]) == decoded.min()
  assert float(s["nu_max"]) == decoded.max()
  assert 0 < decoded.min() and np.isinf(decoded.max())

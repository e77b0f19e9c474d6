"""skip_spikes drops the steps whose gradient norm or loss spikes, exactly."""

import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
from jadam._spikes import SkipSpikesState, skip_spikes
from conftest import assert_bitwise  # pylint: disable=g-bad-import-order

STATISTICS = ("history", "count", "mean", "var")
SPIKE_AT = 12  # call number (1-based) of the spiked step in the short streams


def _params():
  return {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3),
          "b": jnp.array([0.5, -0.25])}


def _grads(steps, seed=0):
  """``steps`` random gradients shaped like ``_params`` (norms 1.5 to 4)."""
  rng = np.random.default_rng(seed)
  return [jax.tree.map(
      lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32),
      _params()) for _ in range(steps)]


def _times(grads, factor):
  return jax.tree.map(lambda g: g * factor, grads)


def _norm(grads):
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64)))
                           for g in jax.tree.leaves(grads))))


def _stepper(opt, donate=False):
  """A jitted ``(params, state, grads, **extra) -> (params, state)`` step."""
  def step(params, state, grads, **extra):
    updates, state = opt.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state
  return jax.jit(step, donate_argnums=(0, 1) if donate else ())


@functools.cache
def _spikes_adam():
  """The wrapper most tests use, with its jitted step (compiled once)."""
  opt = skip_spikes(jadam.adam(0.05), window=16, warmup=8)
  return opt, _stepper(opt)


def _run(opt, stream, step=None, losses=None):
  step = step or _stepper(opt)
  params = _params()
  state = opt.init(params)
  for k, grads in enumerate(stream):
    extra = {} if losses is None else {"loss": losses[k]}
    params, state = step(params, state, grads, **extra)
  return params, state


def _assert_same_statistics(a, b):
  for field in STATISTICS:
    assert_bitwise(getattr(a, field), getattr(b, field))


def test_gradient_spike_is_skipped_as_if_never_seen():
  # A 100x gradient at step 12 (warmup 8): params, the whole Adam state and
  # the statistics end bitwise where the run that never saw it ends; the
  # jitted step donates params and state.
  stream = _grads(20)
  spiked = list(stream)
  spiked[SPIKE_AT - 1] = _times(stream[SPIKE_AT - 1], 100.0)
  without = stream[:SPIKE_AT - 1] + stream[SPIKE_AT:]
  opt = skip_spikes(jadam.adam(0.05), window=16, warmup=8)
  step = _stepper(opt, donate=True)
  params, state = _run(opt, spiked, step)
  expected, expected_state = _run(opt, without, step)
  assert_bitwise(params, expected)
  assert_bitwise(state.inner_state, expected_state.inner_state)
  _assert_same_statistics(state, expected_state)
  assert int(state.count) == 19 and int(state.calls) == 20
  assert int(state.skipped) == 1 and int(expected_state.skipped) == 0
  assert int(state.last_trigger) == SPIKE_AT
  assert int(expected_state.last_trigger) == 0
  np.testing.assert_allclose(float(state.last_value),
                             100.0 * _norm(stream[SPIKE_AT - 1]), rtol=1e-6)
  # And the plain optimizer fed the 19 other steps, up to XLA's rounding.
  plain, _ = _run(jadam.adam(0.05), without)
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(plain)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_skipped_step_returns_zero_updates_and_the_old_state():
  opt, step = _spikes_adam()
  params, state = _run(opt, _grads(10), step)
  spike = _times(_grads(1, seed=1)[0], 100.0)
  updates, new_state = jax.jit(opt.update)(spike, state, params)
  assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates))
  assert_bitwise(new_state.inner_state, state.inner_state)
  _assert_same_statistics(new_state, state)
  assert int(new_state.streak) == 1 and int(new_state.calls) == 11


def _drift_run(opt):
  """Jitted: 1,000 scanned steps of ``opt`` on a 4-parameter model."""
  @jax.jit
  def run(grads):
    params = {"w": jnp.zeros(4)}
    def body(carry, g):
      params, state = carry
      updates, state = opt.update({"w": g}, state, params)
      return (optax.apply_updates(params, updates), state), None
    (_, state), _ = jax.lax.scan(body, (params, opt.init(params)), grads)
    return state
  return run


def test_slow_tenfold_drift_is_kept_and_a_sudden_tenfold_step_skipped():
  # The gradient norm rises 10x over 1,000 steps (5% noise): the default
  # 6 sigma over 128 steps follows it. One step 10x above its neighbours in
  # the same stream is a spike.
  rng = np.random.default_rng(0)
  steps = 1000
  directions = rng.standard_normal((steps, 4))
  directions /= np.linalg.norm(directions, axis=1, keepdims=True)
  norms = 10.0 ** (np.arange(steps) / (steps - 1))
  norms *= 1.0 + 0.05 * rng.standard_normal(steps)
  grads = (directions * norms[:, None]).astype(np.float32)
  run = _drift_run(skip_spikes(jadam.adam(1e-3)))
  state = run(grads)
  assert int(state.skipped) == 0 and int(state.count) == steps
  # The statistics followed: the mean of the last 128 norms (first: 1.16).
  seen = np.linalg.norm(grads.astype(np.float64), axis=1)
  np.testing.assert_allclose(float(state.mean), seen[-128:].mean(),
                             rtol=1e-6)
  jumped = grads.copy()
  jumped[499] *= 10.0
  state = run(jumped)
  assert int(state.skipped) == 1 and int(state.last_trigger) == 500
  assert int(state.count) == steps - 1


def test_loss_spike_is_skipped():
  rng = np.random.default_rng(1)
  losses = list(2.0 + 0.01 * rng.standard_normal(20).astype(np.float32))
  losses[SPIKE_AT - 1] = np.float32(2.5)
  stream = _grads(20)
  opt = skip_spikes(jadam.adam(0.05), window=16, warmup=8, on="loss")
  params, state = _run(opt, stream, losses=losses)
  keep = [k for k in range(20) if k != SPIKE_AT - 1]
  expected, expected_state = _run(opt, [stream[k] for k in keep],
                                  losses=[losses[k] for k in keep])
  assert_bitwise(params, expected)
  assert_bitwise(state.inner_state, expected_state.inner_state)
  _assert_same_statistics(state, expected_state)
  assert int(state.skipped) == 1 and int(state.last_trigger) == SPIKE_AT
  assert float(state.last_value) == np.float32(2.5)


def test_loss_must_be_passed_as_a_real_scalar():
  opt = skip_spikes(optax.sgd(0.1), on="loss")
  params = {"w": jnp.ones(2)}
  state = opt.init(params)
  grads = {"w": jnp.ones(2)}
  update = jax.jit(opt.update)
  with pytest.raises(ValueError, match=r"loss=loss"):
    update(grads, state, params)
  with pytest.raises(ValueError, match=r"real scalar.*float32\[3\]"):
    update(grads, state, params, loss=jnp.ones(3))
  _, state = update(grads, state, params, loss=jnp.asarray(2.0))
  assert float(state.history[-1]) == 2.0


@pytest.mark.parametrize("on", ["grad_norm", "loss"])
def test_nonfinite_signal_is_skipped_and_leaves_the_statistics(on):
  opt = skip_spikes(jadam.adam(0.05), window=16, warmup=8, on=on)
  step = _stepper(opt)
  stream = _grads(11)
  losses = [np.float32(2.0 + 0.01 * k) for k in range(11)]
  params, state = _run(opt, stream[:10], step, losses=losses[:10])
  bad = dict(stream[10])
  loss = losses[10]
  if on == "grad_norm":
    bad["b"] = bad["b"].at[1].set(jnp.nan)
  else:
    loss = np.float32(np.nan)
  new_params, new_state = step(params, state, bad, loss=loss)
  assert_bitwise(new_params, params)
  assert_bitwise(new_state.inner_state, state.inner_state)
  _assert_same_statistics(new_state, state)
  assert np.isfinite(float(new_state.mean)) and np.isfinite(
      float(new_state.var))
  assert int(new_state.skipped) == 1 and int(new_state.last_trigger) == 11
  assert np.isnan(float(new_state.last_value))
  assert int(new_state.streak) == 0  # only finite spikes make a streak


def test_no_spike_is_skipped_during_warmup_but_nonfinite_is():
  # warmup=8: a 100x step with 7 accepted steps behind it is taken, the
  # same step with 8 behind it is skipped; a NaN at step 2 is skipped.
  stream = _grads(9)
  opt, step = _spikes_adam()
  early = stream[:7] + [_times(stream[7], 100.0)]
  params, state = _run(opt, early, step)
  before, _ = _run(opt, early[:7], step)
  assert int(state.skipped) == 0 and int(state.count) == 8
  assert not np.array_equal(params["w"], before["w"])
  on_time = stream[:8] + [_times(stream[8], 100.0)]
  _, state = _run(opt, on_time, step)
  assert int(state.skipped) == 1 and int(state.count) == 8
  poisoned = [stream[0], {**stream[1], "w": stream[1]["w"] * jnp.inf}]
  _, state = _run(opt, poisoned, step)
  assert int(state.skipped) == 1 and int(state.count) == 1


def _reference(values, window, warmup, threshold, restart_after):
  """skip_spikes' rule in float64 NumPy: per step (skipped, count, mean,
  var, margin), margin being |(v − μ) − threshold·σ| / σ where judged."""
  accepted, streak, out = [], 0, []
  for v in values:
    recent = np.asarray(accepted[-window:], np.float64)
    margin = np.inf
    if not np.isfinite(v):
      skip = True
    elif len(accepted) >= warmup:
      mean, std = recent.mean(), recent.std(ddof=1)
      skip = v - mean > threshold * std
      margin = abs((v - mean) - threshold * std) / std
    else:
      skip = False
    if not skip:
      accepted.append(float(v))
      streak = 0
    elif np.isfinite(v):
      streak += 1
      if restart_after is not None and streak >= restart_after:
        accepted, streak = [], 0
    recent = np.asarray(accepted[-window:], np.float64)
    mean = recent.mean() if len(recent) else np.nan
    var = recent.var(ddof=1) if len(recent) > 1 else np.nan
    out.append((skip, len(accepted), mean, var, margin))
  return out


def test_statistics_match_a_float64_transcription():
  # 300 losses around 3.0 with spikes, two NaNs and a lasting jump to 5.0
  # at step 200 (6 skips, then the statistics restart and relearn).
  rng = np.random.default_rng(7)
  values = 3.0 + 0.1 * rng.standard_normal(300)
  values[[40, 41, 90, 150]] += [1.0, 2.0, 0.8, 5.0]
  values[[60, 120]] = np.nan
  values[200:] += 2.0
  values = values.astype(np.float32)
  window, warmup, threshold, restart_after = 32, 8, 4.0, 6
  opt = skip_spikes(optax.sgd(0.1), window, threshold, on="loss",
                    warmup=warmup, restart_after=restart_after)

  @jax.jit
  def run(losses):
    params = {"w": jnp.zeros(1)}
    def body(state, loss):
      _, state = opt.update({"w": jnp.ones(1)}, state, params, loss=loss)
      return state, (state.skipped, state.count, state.mean, state.var)
    return jax.lax.scan(body, opt.init(params), losses)[1]

  skipped, count, mean, var = map(np.asarray, run(values))
  ref = _reference(values.astype(np.float64), window, warmup, threshold,
                   restart_after)
  ref_skip, ref_count, ref_mean, ref_var, margin = map(np.asarray, zip(*ref))
  assert np.min(margin) > 1e-3  # no decision within float32 rounding
  assert ref_skip.sum() == 12 and ref_count[205] == 0  # it did restart
  np.testing.assert_array_equal(np.diff(skipped, prepend=0), ref_skip)
  np.testing.assert_array_equal(count, ref_count)
  np.testing.assert_allclose(mean, ref_mean, rtol=1e-6)
  np.testing.assert_allclose(var, ref_var, rtol=2e-5)


def test_lasting_jump_keeps_skipping_unless_restart_after():
  stream = _grads(20) + [_times(g, 5.0) for g in _grads(20, seed=1)]
  for restart_after, skipped, count in [(None, 20, 20), (4, 4, 16)]:
    opt = skip_spikes(jadam.adam(0.05), window=16, warmup=8,
                      restart_after=restart_after)
    _, state = _run(opt, stream)
    assert int(state.skipped) == skipped and int(state.count) == count
    assert int(state.last_trigger) == (40 if restart_after is None else 24)


def test_decisions_are_per_example_under_vmap():
  stream = _grads(14)
  spiked = list(stream)
  spiked[SPIKE_AT - 1] = _times(stream[SPIKE_AT - 1], 100.0)
  batch = [jax.tree.map(lambda a, b: jnp.stack([a, b]), s, g)
           for s, g in zip(spiked, stream)]
  opt, one_step = _spikes_adam()
  step = jax.jit(jax.vmap(one_step))
  params = jax.tree.map(lambda p: jnp.stack([p, p]), _params())
  state = jax.vmap(opt.init)(params)
  for k, grads in enumerate(batch):
    previous = params
    params, state = step(params, state, grads)
    if k == SPIKE_AT - 1:
      assert np.array_equal(params["w"][0], previous["w"][0])
      assert not np.array_equal(params["w"][1], previous["w"][1])
  np.testing.assert_array_equal(state.skipped, [1, 0])
  np.testing.assert_array_equal(state.count, [13, 14])
  for example, clean in [(0, stream[:SPIKE_AT - 1] + stream[SPIKE_AT:]),
                         (1, stream)]:
    expected, _ = _run(opt, clean, one_step)
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
      np.testing.assert_allclose(x[example], y, rtol=1e-6, atol=1e-7)


def test_skipped_spike_leaves_int8_moments_bitwise():
  storage = jadam.BlockwiseInt8(min_size=0, block_size=2)
  opt = skip_spikes(jadam.adam(0.05, mu_dtype=storage, nu_dtype=storage),
                    window=16, warmup=8)
  step = _stepper(opt)
  params, state = _run(opt, _grads(10), step)
  for moment in (state.inner_state[0].mu, state.inner_state[0].nu):
    # Really 8-bit codes (int8 for m, uint8 for v) with their scales.
    assert {x.dtype.itemsize for x in jax.tree.leaves(moment)} == {1, 4}
  spike = _times(_grads(1, seed=3)[0], 100.0)
  new_params, new_state = step(params, state, spike)
  assert_bitwise(new_params, params)
  assert_bitwise(new_state.inner_state, state.inner_state)
  assert int(new_state.skipped) == 1


@pytest.mark.parametrize("order", ["nonfinite_outside", "spikes_outside"])
def test_composes_with_skip_nonfinite_and_telemetry(order):
  # A 100x spike at step 12 and a NaN at step 15: both dropped, in either
  # order, with telemetry outermost; each wrapper counts what it decided.
  adam = jadam.adam(0.05)
  if order == "nonfinite_outside":
    opt = jadam.with_telemetry(jadam.skip_nonfinite(
        skip_spikes(adam, window=16, warmup=8)))
    spikes_of = lambda s: s.inner_state.inner_state
    nonfinite_of = lambda s: s.inner_state
    counts = (1, 1)  # (spikes', nonfinite's): the NaN never reaches spikes
  else:
    opt = jadam.with_telemetry(skip_spikes(jadam.skip_nonfinite(adam),
                                           window=16, warmup=8))
    spikes_of = lambda s: s.inner_state
    nonfinite_of = lambda s: s.inner_state.inner_state
    counts = (2, 0)  # spikes skips the NaN too and keeps nonfinite's state
  stream = _grads(20)
  bad = list(stream)
  bad[SPIKE_AT - 1] = _times(stream[SPIKE_AT - 1], 100.0)
  bad[14] = {**stream[14], "b": stream[14]["b"].at[0].set(jnp.nan)}
  step = _stepper(opt)
  params, state = _run(opt, bad[:SPIKE_AT], step)
  assert float(jadam.stats(state)["update_norm"]) == 0.0
  assert float(jadam.stats(state)["grad_norm"]) > 100.0
  for grads in bad[SPIKE_AT:]:
    params, state = step(params, state, grads)
  clean = [g for k, g in enumerate(stream) if k not in (SPIKE_AT - 1, 14)]
  expected, expected_state = _run(opt, clean, step)
  assert_bitwise(params, expected)
  assert_bitwise(spikes_of(state).inner_state,
                  spikes_of(expected_state).inner_state)
  _assert_same_statistics(spikes_of(state), spikes_of(expected_state))
  assert (int(spikes_of(state).skipped),
          int(nonfinite_of(state).skipped)) == counts


def test_outer_skip_keeps_the_whole_state_and_is_recorded():
  # jadam_skip from an outer wrapper: nothing of this wrapper moves (not
  # even calls), and it tells the outer one it need not select its state.
  from jadam import _skip  # pylint: disable=g-import-not-at-top
  opt, step = _spikes_adam()
  params, state = _run(opt, _grads(10), step)
  taken = []

  @jax.jit
  def outer(grads, state, params):
    decision = _skip.Decision(jnp.asarray(True))
    updates, new_state = opt.update(grads, state, params,
                                    jadam_skip=decision)
    taken.append(decision.taken(new_state, state))
    return updates, new_state

  updates, new_state = outer(_grads(1, seed=5)[0], state, params)
  assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates))
  assert_bitwise(new_state, state)
  assert taken == [True]


def test_committed_params_compile_the_step_once():
  params = jax.device_put(_params(), jax.devices()[0])
  opt = skip_spikes(jadam.adam(0.05), window=16, warmup=8)
  step = _stepper(opt)
  state = opt.init(params)
  assert state.history.committed
  for grads in _grads(3):
    params, state = step(params, state, grads)
  assert step._cache_size() == 1  # pylint: disable=protected-access


def test_state_is_a_namedtuple_of_the_documented_fields():
  state = skip_spikes(jadam.adam(0.05), window=16).init(_params())
  assert isinstance(state, SkipSpikesState)
  assert state.history.shape == (16,) and state.history.dtype == jnp.float32
  for field in ("count", "streak", "skipped", "last_trigger", "calls"):
    assert getattr(state, field).dtype == jnp.int32, field
  assert np.isnan(float(state.mean)) and np.isnan(float(state.last_value))


@pytest.mark.parametrize("kwargs, message", [
    ({"window": 1}, "window"), ({"threshold": 0.0}, "threshold"),
    ({"on": "grads"}, "on must be"), ({"warmup": 1}, "warmup"),
    ({"restart_after": 0}, "restart_after")])
def test_bad_arguments_are_refused(kwargs, message):
  with pytest.raises(ValueError, match=message):
    skip_spikes(jadam.adam(0.05), **kwargs)


_SHARD_MAP_CHECK = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import json, jax, jax.numpy as jnp, numpy as np, optax, jadam
    from jax.sharding import PartitionSpec as P
    from jadam._spikes import skip_spikes

    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    rng = np.random.default_rng(0)
    grads = rng.standard_normal((6, 4)).astype(np.float32)
    grads[5, :2] *= 100.0  # a spike on the first device's shard only
    losses = np.float32(2.0 + 0.01 * rng.standard_normal((6, 2)))
    losses[5, 0] = 3.0  # and in the first device's loss only
    out = {}
    for on in ("grad_norm", "loss"):
      opt = skip_spikes(jadam.adam(0.1), window=4, warmup=2, on=on,
                        axis_name="data")
      params = {"w": jnp.zeros(4)}
      specs = jadam.sharding.state_specs(opt, params, {"w": P("data")})
      def step(params, state, g, loss):
        updates, state = opt.update({"w": g}, state, params, loss=loss[0])
        return optax.apply_updates(params, updates), state
      step = jax.jit(jax.shard_map(
          step, mesh=mesh, in_specs=({"w": P("data")}, specs, P("data"),
                                     P("data")),
          out_specs=({"w": P("data")}, specs)))
      state = opt.init(params)
      for k in range(6):
        params, state = step(params, state, grads[k], losses[k])
      out[on] = {"skipped": int(state.skipped),
                 "trigger": int(state.last_trigger),
                 "newest": float(state.history[-1])}
    # The newest accepted value: the global norm, the mean loss of step 5.
    out["expected"] = {"grad_norm": float(np.linalg.norm(grads[4])),
                       "loss": float(np.mean(losses[4]))}
    bare = skip_spikes(jadam.adam(0.1))
    try:
      jax.shard_map(lambda g: bare.update({"w": g}, bare.init({"w": g}))[0],
                    mesh=mesh, in_specs=P("data"), out_specs=P("data"))(
                        jnp.ones(4))
      out["refused"] = False
    except ValueError as e:
      out["refused"] = "axis_name" in str(e)
    watched = skip_spikes(jadam.adam(0.1), axis_name="data")
    try:
      jax.shard_map(
          lambda g: watched.update({"w": g}, watched.init({"w": g}))[0],
          mesh=mesh, in_specs=P("data"), out_specs=P("data"),
          check_vma=False)(jnp.ones(4))
      out["unchecked_refused"] = False
    except ValueError as e:
      out["unchecked_refused"] = "check_vma=True" in str(e)
    print(json.dumps(out))
    """)


def test_shard_map_decides_on_the_global_norm_and_mean_loss():
  # Two CPU devices, each with half of the gradient and its own loss: the
  # spike on one device is seen by both, and both skip. Without axis_name,
  # or with check_vma=False (the norm cannot tell split from replicated),
  # a ValueError.
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-c", _SHARD_MAP_CHECK],
                          capture_output=True, text=True, env=env,
                          timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["refused"] and out["unchecked_refused"]
  for on in ("grad_norm", "loss"):
    assert out[on]["skipped"] == 1 and out[on]["trigger"] == 6, out
    np.testing.assert_allclose(out[on]["newest"], out["expected"][on],
                               rtol=1e-6)

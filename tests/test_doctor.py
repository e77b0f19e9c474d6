"""The numerics doctor: each required finding on its planted fault and only
there, the measurements against NumPy, and a doctor that never changes the
step."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import jadam
from jadam import _doctor


def _run(tx, params, grads_fn, steps, jit=True):
  """``steps`` steps of ``tx`` from ``params`` on ``grads_fn(t, params)``;
  returns (params, state)."""
  state = tx.init(params)

  def step(params, state, t):
    updates, state = tx.update(grads_fn(t, params), state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step) if jit else step
  for t in range(steps):
    params, state = step(params, state, jnp.int32(t))
  return params, state


def _found(state, groups=None):
  return sorted((f.path, f.measurement)
                for f in jadam.diagnose(state, groups))


def _noise(shape, scale, t, seed=0):
  key = jax.random.fold_in(jax.random.PRNGKey(seed), t)
  return scale * jax.random.normal(key, shape)


# Planted faults -------------------------------------------------------------

def _bf16_params():
  # "stalls": weights near 1, where bfloat16's spacing (2^-7) dwarfs the
  # 1e-4 steps; "moves": weights near 1e-3 (spacing 2^-17), which move.
  return {"stalls": jnp.ones([64], jnp.bfloat16),
          "moves": jnp.full([64], 1e-3, jnp.bfloat16)}


def _bf16_grads(t, params):
  return {k: _noise([64], 1.0, t, i).astype(jnp.bfloat16)
          for i, k in enumerate(sorted(params))}


def test_rounded_away_names_the_stalled_bfloat16_tensor():
  tx = jadam.doctor(jadam.adam(1e-4), every=5)
  params, state = _run(tx, _bf16_params(), _bf16_grads, 20)
  assert _found(state) == [("stalls", "rounded_away")]
  (finding,) = jadam.diagnose(state)
  assert finding.value == 1.0 and (finding.since, finding.until) == (5, 20)
  assert "stochastic_rounding" in finding.fix
  # It did stall, and the other tensor did move.
  assert bool(jnp.all(params["stalls"] == 1))
  assert float(jnp.max(jnp.abs(params["moves"].astype(jnp.float32)
                               - 1e-3))) > 5e-4


def test_rounded_away_clears_with_stochastic_rounding():
  tx = jadam.doctor(optax.chain(jadam.adam(1e-4),
                                jadam.stochastic_rounding(seed=0)), every=5)
  params, state = _run(tx, _bf16_params(), _bf16_grads, 20)
  assert _found(state) == []
  log = jadam.doctor_log(state)
  # Lost in expectation only below half a float32 ulp (here 1 of 64).
  assert log["doctor/stalls/rounded_away"] < 0.05
  assert bool(jnp.any(params["stalls"] != 1))  # it moves, in expectation


def _small_grads(t, params):
  # A regression whose gradients are about 1e-4.
  x = _noise([32, 16], 1.0, t, 7)
  y = jnp.sin(x[:, :1])

  def loss(p):
    h = jnp.tanh(x @ p["hidden"])
    return 1e-4 * jnp.mean((h @ p["out"] - y) ** 2)
  return jax.grad(loss)(params)


def _mlp():
  key = jax.random.PRNGKey(1)
  return {"hidden": jax.random.normal(key, [16, 32]) / 4,
          "out": jax.random.normal(jax.random.fold_in(key, 1), [32, 1]) / 6}


@pytest.mark.parametrize("eps,expected", [
    (1e-3, [("hidden", "eps_dominated"), ("out", "eps_dominated")]),
    (1e-8, [])])
def test_eps_dominated_when_eps_is_above_the_gradients(eps, expected):
  tx = jadam.doctor(jadam.adamw(1e-3, eps=eps), every=5)
  _, state = _run(tx, _mlp(), _small_grads, 20)
  assert _found(state) == expected
  log = jadam.doctor_log(state)
  share = log["doctor/hidden/eps_dominated"]
  assert share == 1.0 if eps == 1e-3 else share == 0.0


def test_eps_dominated_on_a_flat_view_names_the_tensors():
  params = _mlp()
  view = jadam.FlatView(params)
  tx = jadam.doctor(jadam.adam(1e-3, eps=1e-3), every=5, view=view)
  grads_fn = lambda t, flat: view.ravel(_small_grads(t, view.unravel(flat)))
  _, state = _run(tx, view.ravel(params), grads_fn, 20)
  assert _found(state) == [("hidden", "eps_dominated"),
                           ("out", "eps_dominated")]


def _outlier_grads(t, params):
  out = {}
  for i, (name, p) in enumerate(sorted(params.items())):
    g = _noise(p.shape, 1.0, t, i)
    if name == "outliers":
      # One element per block of 256 is 10^6 times the rest.
      g = g.reshape(-1, 256).at[:, 7].multiply(1e6).reshape(p.shape)
    out[name] = g
  return out


def test_storage_error_names_the_int8_tensor_with_outliers_only():
  int8 = jadam.BlockwiseInt8(min_size=0)
  tx = jadam.doctor(jadam.adam(1e-3, mu_dtype=int8, nu_dtype=int8), every=2)
  params = {"outliers": jnp.zeros([32, 256]), "smooth": jnp.zeros([32, 256]),
            "bias": jnp.zeros([256])}
  _, state = _run(tx, params, _outlier_grads, 8)
  assert _found(state) == [("outliers", "storage_error")]
  log = jadam.doctor_log(state)
  assert log["doctor/outliers/storage_error"] > 0.4
  assert log["doctor/smooth/storage_error"] < 0.05
  # Float32 moments are not compressed: nothing to measure.
  tx = jadam.doctor(jadam.adam(1e-3), every=2)
  _, state = _run(tx, params, _outlier_grads, 8)
  assert np.isnan(jadam.doctor_log(state)["doctor/outliers/storage_error"])
  assert _found(state) == []


def test_nonfinite_origin_names_the_tensor_of_a_skipped_step():
  poisoned = 7  # not a measuring step (every=10)

  def grads_fn(t, params):
    g = {k: _noise(v.shape, 1.0, t, i)
         for i, (k, v) in enumerate(sorted(params.items()))}
    g["b"] = jnp.where(t == poisoned - 1, jnp.nan, g["b"])
    return g
  tx = jadam.doctor(jadam.skip_nonfinite(jadam.adam(1e-3)), every=10)
  params = {"a": jnp.ones([8]), "b": jnp.ones([8]), "c": jnp.ones([8])}
  params, state = _run(tx, params, grads_fn, 12)
  (finding,) = jadam.diagnose(state)
  assert (finding.path, finding.measurement) == ("b", "nonfinite")
  assert (finding.value, finding.until) == (1.0, poisoned)
  assert int(state.inner_state.skipped) == 1
  assert bool(jnp.all(jnp.isfinite(params["b"])))
  assert "last 7" in str(jadam.diagnose(state))


# Measurements against NumPy -------------------------------------------------

def test_one_step_measurements_equal_a_numpy_transcription():
  rng = np.random.default_rng(0)
  p = rng.normal(size=[40, 30]).astype(np.float32)
  p[0] = 1e4  # a row whose ~1e-4 steps are below half a float32 ulp
  g = rng.normal(size=[40, 30]).astype(np.float32) * 1e-2
  g[5] = 0.0
  params, grads = {"w": jnp.asarray(p)}, {"w": jnp.asarray(g)}
  tx = jadam.doctor(jadam.adam(1e-4, eps=1e-3), every=1)
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  u = np.asarray(updates["w"], np.float64)
  log = jadam.doctor_log(state)
  moving = u != 0
  lost = moving & ((p + np.asarray(updates["w"])) == p)
  assert log["doctor/w/rounded_away"] == pytest.approx(
      lost.sum() / moving.sum())
  assert lost.sum() == 30  # exactly the row of 1e4
  assert log["doctor/w/update_ratio"] == pytest.approx(
      np.sqrt((u ** 2).sum() / (p.astype(np.float64) ** 2).sum()), rel=1e-5)
  assert log["doctor/w/zero_grad"] == pytest.approx(30 / 1200)
  # Step 1: v̂ = g², so √v̂ = |g| and g²/v̂ = 1 where g is not zero.
  g64 = np.abs(g.astype(np.float64))
  valid = g64 > 0
  assert log["doctor/w/eps_dominated"] == pytest.approx(
      (g64[valid] < 1e-3).sum() / valid.sum())
  # (1 − β2) and 1 − β2^1 round differently in float32: 1.3e-5 apart.
  assert log["doctor/w/lag_max"] == pytest.approx(1.0, rel=1e-4)
  hist = np.asarray(state.measurements.lag_hist[0])
  # g²/v̂ is 1 up to rounding: bins [1/4, 1) and [1, 4).
  assert hist.sum() == valid.sum() and hist[4] + hist[5] == valid.sum()


def test_lag_histogram_bins_and_maximum_against_numpy():
  rng = np.random.default_rng(1)
  g1 = rng.normal(size=[4096]).astype(np.float32)
  g2 = (g1 * np.exp(rng.uniform(-6, 6, size=[4096]))).astype(np.float32)
  params = {"w": jnp.zeros([4096])}
  tx = jadam.doctor(jadam.adam(1e-3, b2=0.9), every=2)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for g in (g1, g2):
    _, state = step({"w": jnp.asarray(g)}, state, params)
  v = 0.1 * 0.9 * g1.astype(np.float64) ** 2 + 0.1 * g2.astype(
      np.float64) ** 2
  lag = g2.astype(np.float64) ** 2 / (v / (1 - 0.9 ** 2))
  edges = np.array(_doctor.LAG_EDGES)
  expected = np.bincount(np.searchsorted(edges, lag, side="right"),
                         minlength=len(edges) + 1)
  got = np.asarray(state.measurements.lag_hist[0])
  assert np.abs(got - expected).sum() <= 4  # float32 ties at the edges
  assert float(state.measurements.values["lag_max"][0]) == pytest.approx(
      lag.max(), rel=1e-4)


def test_large_tensors_are_sampled_within_a_percent_of_the_exact_share():
  n = 1 << 18  # above SAMPLE_ABOVE
  rng = np.random.default_rng(2)
  g = rng.normal(size=[n]).astype(np.float32)
  g[rng.uniform(size=n) < 0.3] = 0.0
  tx = jadam.doctor(jadam.adam(1e-3), every=1)
  params = {"w": jnp.ones([n])}
  state = tx.init(params)
  _, state = jax.jit(tx.update)({"w": jnp.asarray(g)}, state, params)
  exact = float(np.mean(g == 0))
  assert abs(jadam.doctor_log(state)["doctor/w/zero_grad"] - exact) < 0.01


def test_embedding_rows_without_gradient_since_the_last_measurement():
  rows = 2048

  def grads_fn(t, params):
    touched = (jnp.arange(rows) % 64 == t % 8)[:, None]  # 32 rows a step
    return {"embed": jnp.where(touched, 1.0, 0.0) * jnp.ones([rows, 8]),
            "dense": jnp.ones([8, 8])}
  tx = jadam.doctor(jadam.adam(1e-3), every=4)
  params = {"embed": jnp.zeros([rows, 8]), "dense": jnp.zeros([8, 8])}
  _, state = _run(tx, params, grads_fn, 8)
  log = jadam.doctor_log(state)
  # Steps 5–8 touched rows with i % 64 in {4, 5, 6, 7}: 128 of 2048.
  assert log["doctor/embed/rows_unseen"] == pytest.approx(1 - 128 / rows)
  assert np.isnan(log["doctor/dense/rows_unseen"])
  assert state.measurements.row_paths == ("embed",)


# The doctor itself ------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: jadam.adamw(1e-3, weight_decay=1e-2),
    lambda: jadam.adam(1e-3, mu_dtype=jadam.BlockwiseInt8(min_size=0),
                       nu_dtype=jadam.BlockwiseInt8(min_size=0)),
    lambda: optax.chain(optax.clip_by_global_norm(0.1), jadam.nadam(1e-3)),
    lambda: optax.adam(1e-3),
])
def test_the_doctor_changes_the_step_by_at_most_one_ulp(make):
  # The step that trains is the plain optimizer's; XLA may still fuse it
  # differently inside the larger program, rounding a last bit otherwise.
  params = {"a": jnp.ones([16, 256]), "b": jnp.zeros([256])}
  grads_fn = lambda t, p: {k: _noise(v.shape, 1.0, t, i)
                           for i, (k, v) in enumerate(sorted(p.items()))}
  params, inner = _run(make(), params, grads_fn, 5)
  doctor = jadam.doctor(make(), every=1)
  state = doctor.init(params)._replace(inner_state=inner)
  grads = grads_fn(jnp.int32(5), params)
  plain, plain_inner = jax.jit(make().update)(grads, inner, params)
  doctored, state = jax.jit(doctor.update)(grads, state, params)
  for k in params:
    ulp = np.spacing(np.abs(np.asarray(plain[k])))
    assert np.all(np.abs(np.asarray(doctored[k]) - np.asarray(plain[k]))
                  <= ulp), k
  assert int(state.measured_at) == 1


def test_measures_steps_k_2k_and_compiles_once():
  tx = jadam.doctor(jadam.adam(1e-3), every=3)
  params = {"w": jnp.ones([8])}
  state = tx.init(params)
  step = jax.jit(tx.update)
  seen = []
  for _ in range(7):
    _, state = step({"w": jnp.ones([8])}, state, params)
    seen.append(int(state.measured_at))
  assert seen == [0, 0, 3, 3, 3, 6, 6]
  assert step._cache_size() == 1


def test_group_names_in_findings():
  groups = [jadam.Group("head", "out", learning_rate=1e-3)]
  tx = jadam.doctor(jadam.adamw(1e-3, eps=1e-3, groups=groups), every=5)
  _, state = _run(tx, _mlp(), _small_grads, 15)
  assert {(f.path, f.group) for f in jadam.diagnose(state, groups)} == {
      ("hidden", "default"), ("out", "head")}


def test_doctor_log_totals_each_group_weighted_by_size():
  groups = [jadam.Group("head", "out", learning_rate=1e-3)]
  tx = jadam.doctor(jadam.adamw(1e-3, eps=1e-3, groups=groups), every=5)
  _, state = _run(tx, _mlp(), _small_grads, 5)
  log = jadam.doctor_log(state, groups)
  hidden, out = (log[f"doctor/{p}/update_ratio"] for p in ("hidden", "out"))
  assert log["doctor/group/head/update_ratio"] == pytest.approx(out)
  assert log["doctor/group/default/update_ratio"] == pytest.approx(hidden)
  assert log["doctor/group/default/nonfinite_steps"] == 0.0


def test_under_vmap_each_copy_is_measured():
  tx = jadam.doctor(jadam.adam(1e-3, eps=1e-3), every=1)
  params = {"w": jnp.ones([2, 8])}
  grads = {"w": jnp.stack([jnp.full([8], 1e-5), jnp.full([8], 1.0)])}
  state = jax.vmap(tx.init)(params)
  _, state = jax.jit(jax.vmap(tx.update))(grads, state, params)
  np.testing.assert_array_equal(
      np.asarray(state.measurements.values["eps_dominated"]), [[1.0], [0.0]])


def test_update_without_params_raises():
  tx = jadam.doctor(jadam.adam(1e-3))
  state = tx.init({"w": jnp.ones(2)})
  with pytest.raises(ValueError, match="needs the parameters"):
    tx.update({"w": jnp.ones(2)}, state)


@pytest.mark.parametrize("every", [0, -1, 2.5, True])
def test_every_must_be_a_positive_integer(every):
  with pytest.raises(ValueError, match="positive integer"):
    jadam.doctor(jadam.adam(1e-3), every=every)


def test_diagnose_without_a_doctor_raises():
  state = jadam.adam(1e-3).init({"w": jnp.ones(2)})
  with pytest.raises(ValueError, match="holds no doctor"):
    jadam.diagnose(state)


def test_thresholds_can_be_set():
  tx = jadam.doctor(jadam.adam(1e-3, eps=1e-3), every=1,
                    thresholds=jadam.Thresholds(eps_dominated=1.0,
                                                persist=1))
  params = {"w": jnp.ones(4)}
  _, state = _run(tx, params, lambda t, p: {"w": jnp.full(4, 1e-5)}, 3)
  assert _found(state) == []  # a share of 1.0 is not over 1.0
  tx = jadam.doctor(jadam.adam(1e-3, eps=1e-3), every=1,
                    thresholds=jadam.Thresholds(persist=1))
  _, state = _run(tx, params, lambda t, p: {"w": jnp.full(4, 1e-5)}, 1)
  assert _found(state) == [("w", "eps_dominated")]


def test_doctor_log_keys_are_stable():
  tx = jadam.doctor(jadam.adam(1e-3), every=2)
  params = {"layer": {"kernel": jnp.ones([3, 3])}}
  state = tx.init(params)
  before = set(jadam.doctor_log(state))
  _, state = jax.jit(tx.update)({"layer": {"kernel": jnp.ones([3, 3])}},
                                state, params)
  assert set(jadam.doctor_log(state)) == before
  assert "doctor/layer/kernel/rounded_away" in before


def test_bfloat16_lost_share_matches_numpy():
  p = np.linspace(0.5, 2.0, 256).astype(ml_dtypes.bfloat16)
  g = np.ones([256], np.float32)
  params = {"w": jnp.asarray(p)}
  tx = jadam.doctor(optax.sgd(3e-3), every=1)
  state = tx.init(params)
  _, state = tx.update({"w": jnp.asarray(g, jnp.bfloat16)}, state, params)
  new = (p.astype(np.float32) - np.float32(3e-3)).astype(ml_dtypes.bfloat16)
  expected = float(np.mean(new == p))
  assert jadam.doctor_log(state)["doctor/w/rounded_away"] == pytest.approx(
      expected)
  assert 0 < expected < 1


def test_rounded_away_on_float32_says_the_rate_is_below_its_resolution():
  # Weights of 1e4 with 1e-4 steps: below half a float32 spacing (4.9e-4).
  tx = jadam.doctor(jadam.adam(1e-4), every=2)
  params = {"w": jnp.full([16], 1e4)}
  _, state = _run(tx, params, lambda t, p: {"w": _noise([16], 1.0, t)}, 6)
  (finding,) = jadam.diagnose(state)
  assert finding.measurement == "rounded_away" and finding.value == 1.0
  assert "decays to zero" in finding.fix
  assert "stochastic_rounding" not in finding.fix

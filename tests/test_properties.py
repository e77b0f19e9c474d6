"""Properties over random pytrees and hyperparameters (hypothesis).

Trees nest dicts, lists and tuples; leaves are float32, bfloat16 or float16
(float64 under x64), scalars, and zero-size arrays. Hyperparameters range
over their documented valid intervals, or just outside them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jadam

ALIASES = ["adam", "adamw", "nadam", "nadamw", "amsgrad", "adamax", "adamaxw",
           "radam"]
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
FEW = settings(SETTINGS, max_examples=8)

shapes = st.lists(st.integers(0, 3), max_size=3).map(tuple)


def leaves(dtypes):
  return st.tuples(shapes, st.sampled_from(dtypes))


def trees(dtypes=("float32", "bfloat16", "float16")):
  """Nested containers of (shape, dtype) specs, at least one leaf."""
  return st.recursive(
      leaves(dtypes),
      lambda children: st.one_of(
          st.dictionaries(st.sampled_from("abcd"), children, min_size=1,
                          max_size=3),
          st.lists(children, min_size=1, max_size=3),
          st.tuples(children, children)),
      max_leaves=5)


def _is_spec(x):
  return (isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], str)
          and isinstance(x[0], tuple))


def materialize(spec, seed, scale=1.0):
  """Arrays for a tree of (shape, dtype) specs, from a seed."""
  flat, treedef = jax.tree.flatten(spec, is_leaf=_is_spec)
  keys = jax.random.split(jax.random.PRNGKey(seed), max(len(flat), 1))
  arrays = [(scale * jax.random.normal(k, shape)).astype(dtype)
            for k, (shape, dtype) in zip(keys, flat)]
  return treedef.unflatten(arrays)


hyperparameters = st.fixed_dictionaries({
    "learning_rate": st.floats(0.0, 1.0),
    "b1": st.floats(0.0, 0.999),
    "b2": st.floats(0.0, 0.9999),
    "eps": st.floats(1e-8, 1e-1),
})


def _signature(tree):
  return jax.tree.structure(tree), [
      (x.shape, x.dtype) for x in jax.tree.leaves(tree)]


def _check_properties(name, hyper, params, grads_per_step):
  opt = getattr(jadam, name)(**hyper)
  state = opt.init(params)
  # init: one moment per parameter, with its shape.
  moments = state[0]
  for tree in (moments.mu, moments.nu):
    assert jax.tree.structure(tree) == jax.tree.structure(params)
    assert ([x.shape for x in jax.tree.leaves(tree)]
            == [p.shape for p in jax.tree.leaves(params)])
  init_signature = _signature(state)

  @jax.jit
  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return updates, optax.apply_updates(params, updates), state

  for grads in grads_per_step:
    updates, new_params, new_state = step(params, state, grads)
    # Same inputs, same bits (and the same as an eagerly run update).
    again = step(params, state, grads)
    for x, y in zip(jax.tree.leaves((updates, new_params, new_state)),
                    jax.tree.leaves(again)):
      assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    assert _signature(updates) == _signature(params)
    assert _signature(new_params) == _signature(params)
    assert _signature(new_state) == init_signature
    for u in jax.tree.leaves(updates):
      assert np.all(np.isfinite(np.asarray(u, np.float64)))
    params, state = new_params, new_state
  return params, state


@SETTINGS
@given(name=st.sampled_from(ALIASES), hyper=hyperparameters, spec=trees(),
       seed=st.integers(0, 2**16), scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_updates_finite_and_state_stable_under_jit(name, hyper, spec, seed,
                                                   scale):
  params = materialize(spec, seed)
  grads = [materialize(spec, seed + t + 1, scale) for t in range(3)]
  _check_properties(name, hyper, params, grads)


@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(ALIASES), hyper=hyperparameters,
       spec=trees(("float64", "float32")), seed=st.integers(0, 2**16))
def test_float64_under_x64(name, hyper, spec, seed):
  with jax.enable_x64(True):
    params = materialize(spec, seed)
    grads = [materialize(spec, seed + t + 1) for t in range(2)]
    _, state = _check_properties(name, hyper, params, grads)
    for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(state[0].mu)):
      assert m.dtype == p.dtype  # float64 moments stay float64


@FEW
@given(spec=trees(), seed=st.integers(0, 2**16), data=st.data())
def test_a_single_nonfinite_entry_anywhere_is_skipped(spec, seed, data):
  params = materialize(spec, seed)
  paths = [i for i, x in enumerate(jax.tree.leaves(params)) if x.size]
  if not paths:
    return  # nothing can hold a NaN
  which = data.draw(st.sampled_from(paths))
  bad = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
  leaves_, treedef = jax.tree.flatten(materialize(spec, seed + 1))
  flat = leaves_[which].ravel()
  index = data.draw(st.integers(0, flat.size - 1))
  leaves_[which] = flat.at[index].set(bad).reshape(leaves_[which].shape)
  grads = treedef.unflatten(leaves_)

  opt = jadam.skip_nonfinite(jadam.adamw(0.1))
  state = opt.init(params)
  updates, new_state = jax.jit(opt.update)(grads, state, params)
  assert all(not np.any(np.asarray(u, np.float64)) for u in
             jax.tree.leaves(updates))
  for x, y in zip(jax.tree.leaves(new_state.inner_state),
                  jax.tree.leaves(state.inner_state)):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
  assert int(new_state.skipped) == 1


@FEW
@given(spec=trees(), seed=st.integers(0, 2**16))
def test_telemetry_norms_are_consistent(spec, seed):
  params = materialize(spec, seed)
  grads = materialize(spec, seed + 1)
  opt = jadam.with_telemetry(jadam.adam(0.01))
  _, state = jax.jit(opt.update)(grads, opt.init(params), params)
  s = {k: float(v) for k, v in jadam.stats(state).items()}
  n = sum(x.size for x in jax.tree.leaves(grads))
  # max|g| <= ‖g‖ <= √n·max|g|, and v >= 0 wherever it exists.
  assert s["grad_max_abs"] <= s["grad_norm"] * (1 + 1e-6)
  assert s["grad_norm"] <= np.sqrt(n) * s["grad_max_abs"] * (1 + 1e-6)
  if n:
    assert 0.0 <= s["nu_min"] <= s["nu_max"]
  assert s["update_norm"] <= 0.01 * np.sqrt(n) * (1 + 1e-3)  # |step| <= lr
  assert s["step"] == 1 and s["skipped_steps"] == 0


# ---------------------------------------------------------------------------
# Invalid inputs raise the documented exception.

outside_unit = st.one_of(st.floats(max_value=-1e-6), st.floats(min_value=1.0),
                         st.just(float("nan")))
negative = st.one_of(st.floats(max_value=-1e-12), st.just(float("nan")),
                     st.just(float("inf")))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(name=st.sampled_from(ALIASES), field=st.sampled_from(["b1", "b2"]),
       value=outside_unit)
def test_decay_outside_unit_interval_raises_value_error(name, field, value):
  with pytest.raises(ValueError, match=field):
    getattr(jadam, name)(1e-3, **{field: value})


@settings(max_examples=40, deadline=None, derandomize=True)
@given(name=st.sampled_from(ALIASES),
       field=st.sampled_from(["learning_rate", "eps"]), value=negative)
def test_negative_or_nonfinite_terms_raise_value_error(name, field, value):
  kwargs = {"learning_rate": 1e-3, field: value}
  with pytest.raises(ValueError, match=field):
    getattr(jadam, name)(**kwargs)


@FEW
@given(spec=trees(), seed=st.integers(0, 2**16), data=st.data())
def test_gradients_of_another_tree_raise_value_error(spec, seed, data):
  params = materialize(spec, seed)
  opt = jadam.adam(1e-3)
  state = opt.init(params)
  grads = data.draw(st.sampled_from(["extra", "missing", "reshaped"]))
  if grads == "extra":
    bad = {"params": params, "extra": jnp.ones(2)}
  elif grads == "missing":
    bad = jax.tree.leaves(params)[:-1]
    if not bad:
      bad = {}
  else:
    bad = jax.tree.map(lambda p: jnp.zeros(p.shape + (1,), p.dtype), params)
  with pytest.raises(ValueError, match="gradient"):
    opt.update(bad, state, params)


@FEW
@given(spec=trees(), seed=st.integers(0, 2**16),
       dtype=st.sampled_from(["int32", "int8", "bool", "uint8"]))
def test_integer_gradients_raise_type_error(spec, seed, dtype):
  params = materialize(spec, seed)
  opt = jadam.adam(1e-3)
  grads = jax.tree.map(lambda p: jnp.zeros(p.shape, dtype), params)
  with pytest.raises(TypeError, match="floating-point"):
    opt.update(grads, opt.init(params), params)

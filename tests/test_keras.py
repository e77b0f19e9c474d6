"""``numerics="keras"`` reproduces keras.optimizers.Adam and AdamW (Keras 3).

Keras runs on its JAX backend in a subprocess (this file, run as a script), so
that choosing its backend cannot leak into other tests. It records, for each
case, the gradients it was given and the parameters after every step; jadam
then replays the same gradients from the same start (lockstep), or trains a
JAX port of the same Keras model on its own (free-running), and every
parameter along the trajectory must agree to 1e-6 relative.

``python tests/test_keras.py`` (no argument) prints the largest relative
error of each case instead, as quoted in docs/variants.md.
"""

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
from conftest import relative_error

# Keras is in the test extra; where it is not installed there is nothing to
# compare with. (Only looked up: importing it here would choose its backend
# in this process.)
if importlib.util.find_spec("keras") is None:
  pytest.skip("needs Keras (pip install 'jadam[test]')",
              allow_module_level=True)

STEPS = 100
N_IN, N_HIDDEN = 5, 16
NAMES = ("dense1_kernel", "dense1_bias", "dense2_kernel", "dense2_bias")


def _data():
  rng = np.random.RandomState(0)
  x = rng.normal(size=(64, N_IN)).astype(np.float32)
  y = np.sin(x @ np.arange(1.0, N_IN + 1) / 5)[:, None].astype(np.float32)
  return x, y


def _initial_params():
  rng = np.random.RandomState(1)
  return {
      "dense1_kernel": (0.5 * rng.normal(size=(N_IN, N_HIDDEN))).astype(
          np.float32),
      "dense1_bias": np.zeros(N_HIDDEN, np.float32),
      "dense2_kernel": (0.5 * rng.normal(size=(N_HIDDEN, 1))).astype(
          np.float32),
      "dense2_bias": np.zeros(1, np.float32),
  }


def _loss(params, x, y, scale=1.0):
  """The Keras model below, ported: Dense(tanh) → Dense, mean squared error."""
  h = jnp.tanh(x @ params["dense1_kernel"] + params["dense1_bias"])
  out = h @ params["dense2_kernel"] + params["dense2_bias"]
  return scale * jnp.mean(jnp.mean(jnp.square(out - y), axis=-1))


# name: (Keras optimizer kwargs, exclude bias from decay, loss scale,
#        the jadam optimizer that should match it)
CASES = {
    "adam": ({"class": "Adam", "learning_rate": 1e-2}, False, 1.0,
             lambda: jadam.adam(1e-2, eps=1e-7, numerics="keras")),
    "adam_betas": ({"class": "Adam", "learning_rate": 3e-3, "beta_1": 0.8,
                    "beta_2": 0.95, "epsilon": 1e-5}, False, 1.0,
                   lambda: jadam.adam(3e-3, b1=0.8, b2=0.95, eps=1e-5,
                                      numerics="keras")),
    "adam_amsgrad": ({"class": "Adam", "learning_rate": 1e-2,
                      "beta_2": 0.99, "amsgrad": True}, False, 1.0,
                     lambda: jadam.amsgrad(1e-2, b2=0.99, eps=1e-7,
                                           numerics="keras")),
    "adamw": ({"class": "AdamW", "learning_rate": 5e-3,
               "weight_decay": 0.05}, False, 1.0,
              lambda: jadam.adamw(5e-3, eps=1e-7, weight_decay=0.05,
                                  numerics="keras")),
    "adamw_no_bias_decay": (
        {"class": "AdamW", "learning_rate": 1e-2, "weight_decay": 0.05}, True,
        1.0,
        lambda: jadam.adamw(
            1e-2, eps=1e-7, weight_decay=0.05, numerics="keras",
            mask=lambda p: {k: not k.endswith("bias") for k in p})),
    # keras.optimizers.schedules.ExponentialDecay(1e-2, 10, 0.8) is
    # optax.exponential_decay(1e-2, 10, 0.8); both read the count from 0.
    "adamw_schedule": (
        {"class": "AdamW", "exponential_decay": (1e-2, 10, 0.8),
         "weight_decay": 0.05}, False, 1.0,
        lambda: jadam.adamw(optax.exponential_decay(1e-2, 10, 0.8), eps=1e-7,
                            weight_decay=0.05, numerics="keras")),
    # Gradients of order ε: where Keras's ε (on √v_t) and the paper's (on
    # √v̂_t) give different steps.
    "adam_tiny_gradients": ({"class": "Adam", "learning_rate": 1e-3}, False,
                            1e-6,
                            lambda: jadam.adam(1e-3, eps=1e-7,
                                               numerics="keras")),
}


# --------------------------------------------------------------------------
# The Keras side, run in a subprocess with KERAS_BACKEND=jax.
# --------------------------------------------------------------------------


def _keras_optimizer(keras, config, exclude_bias):
  kwargs = dict(config)
  if "exponential_decay" in kwargs:
    kwargs["learning_rate"] = keras.optimizers.schedules.ExponentialDecay(
        *kwargs.pop("exponential_decay"))
  optimizer = getattr(keras.optimizers, kwargs.pop("class"))(**kwargs)
  if exclude_bias:
    optimizer.exclude_from_weight_decay(var_names=["bias"])
  return optimizer


def _keras_model(keras, start):
  model = keras.Sequential([
      keras.Input((N_IN,)),
      keras.layers.Dense(N_HIDDEN, activation="tanh", name="dense1"),
      keras.layers.Dense(1, name="dense2"),
  ])
  model.set_weights([start[name] for name in NAMES])
  return model


def _run_keras(out_path):
  os.environ["KERAS_BACKEND"] = "jax"
  import keras  # pylint: disable=g-import-not-at-top
  assert keras.backend.backend() == "jax"
  x, y = _data()
  start = _initial_params()
  results = {}
  for case, (config, exclude_bias, scale, _) in CASES.items():
    # Lockstep: Keras's optimizer on the model's variables, gradients from
    # the ported loss, recorded so that jadam can be fed the same ones.
    model = _keras_model(keras, start)
    optimizer = _keras_optimizer(keras, config, exclude_bias)
    optimizer.build(model.trainable_variables)
    # Keras's own stateless update (what model.fit runs on JAX), jitted.
    apply = jax.jit(optimizer.stateless_apply)
    grad_fn = jax.jit(jax.grad(_loss))
    train_values = [v.value for v in model.trainable_variables]
    optimizer_values = [v.value for v in optimizer.variables]
    for step in range(STEPS):
      grads = grad_fn(dict(zip(NAMES, train_values)), x, y, scale)
      train_values, optimizer_values = apply(
          optimizer_values, [grads[name] for name in NAMES], train_values)
      for name, value in zip(NAMES, train_values):
        results[f"{case}/lockstep/grad/{step}/{name}"] = np.asarray(
            grads[name])
        results[f"{case}/lockstep/param/{step}/{name}"] = np.asarray(value)
    # Free-running: the Keras model trains itself with its own gradients.
    model = _keras_model(keras, start)
    optimizer = _keras_optimizer(keras, config, exclude_bias)
    model.compile(optimizer=optimizer, loss="mse")
    for step in range(STEPS):
      model.train_on_batch(x, y * np.float32(1.0))
      for name, w in zip(NAMES, model.get_weights()):
        results[f"{case}/free/param/{step}/{name}"] = w
  np.savez(out_path, **results)


# --------------------------------------------------------------------------
# The tests.
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keras_runs(tmp_path_factory):
  out = tmp_path_factory.mktemp("keras") / "runs.npz"
  env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  env["PYTHONPATH"] = os.pathsep.join(
      [tests_dir, os.path.dirname(tests_dir), env.get("PYTHONPATH", "")])
  subprocess.run([sys.executable, os.path.abspath(__file__), str(out)],
                 check=True, env=env, timeout=600)
  with np.load(out) as runs:
    return dict(runs)


def _params(runs, key):
  return {name: runs[f"{key}/{name}"] for name in NAMES}


def _replay(opt, runs, case):
  """jadam fed Keras's gradients; the parameters after every step."""
  params = jax.tree.map(jnp.asarray, _initial_params())
  state = opt.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  trajectory = []
  for t in range(STEPS):
    params, state = step(params, state,
                         _params(runs, f"{case}/lockstep/grad/{t}"))
    trajectory.append(params)
  return trajectory


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_step_matches_keras_given_the_same_gradients(keras_runs, case):
  trajectory = _replay(CASES[case][3](), keras_runs, case)
  errors = [relative_error(params,
                           _params(keras_runs, f"{case}/lockstep/param/{t}"))
            for t, params in enumerate(trajectory)]
  assert max(errors) < 1e-6, (max(errors), int(np.argmax(errors)))
  # The trajectory went somewhere: 100 steps moved the parameters.
  assert relative_error(trajectory[-1], _initial_params()) > 1e-3


@pytest.mark.parametrize("case", sorted(
    c for c in CASES if CASES[c][2] == 1.0))
def test_ported_model_trains_like_keras(keras_runs, case):
  """A JAX port of the Keras model, trained by jadam, follows Keras's path."""
  opt = CASES[case][3]()
  x, y = map(jnp.asarray, _data())
  params = jax.tree.map(jnp.asarray, _initial_params())
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(_loss)(params, x, y)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  worst = 0.0
  for t in range(STEPS):
    params, state = step(params, state)
    worst = max(worst, relative_error(
        params, _params(keras_runs, f"{case}/free/param/{t}")))
  assert worst < 1e-6
  x_np, y_np = _data()
  assert float(_loss(params, x_np, y_np)) < 0.5 * float(
      _loss(_initial_params(), x_np, y_np))


def test_optax_numerics_do_not_match_keras_when_gradients_are_tiny(
    keras_runs):
  """The flag matters: with |g| ~ ε the two placements of ε disagree."""
  case = "adam_tiny_gradients"
  keras_path = [_params(keras_runs, f"{case}/lockstep/param/{t}")
                for t in range(STEPS)]
  ours = _replay(jadam.adam(1e-3, eps=1e-7), keras_runs, case)
  start = _initial_params()
  moved = lambda p: jax.tree.map(lambda a, b: np.asarray(a) - b, p, start)
  # Compare the displacement from the start, where the difference shows.
  assert relative_error(moved(ours[-1]), moved(keras_path[-1])) > 0.1
  matched = _replay(CASES[case][3](), keras_runs, case)
  assert relative_error(moved(matched[-1]), moved(keras_path[-1])) < 1e-4


def _report():
  """Print the worst relative error along each trajectory (docs/variants.md)."""
  import tempfile  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "runs.npz")
    _run_keras(out)
    with np.load(out) as loaded:
      runs = dict(loaded)
  x, y = map(jnp.asarray, _data())
  print("| case | lockstep (same gradients) | ported model, free-running |")
  print("| --- | --- | --- |")
  for case, (_, _, scale, make) in CASES.items():
    lockstep = max(
        relative_error(p, _params(runs, f"{case}/lockstep/param/{t}"))
        for t, p in enumerate(_replay(make(), runs, case)))
    free = "—"
    if scale == 1.0:
      opt = make()
      params = jax.tree.map(jnp.asarray, _initial_params())
      state = opt.init(params)
      step = jax.jit(lambda p, s: (lambda u_s: (
          optax.apply_updates(p, u_s[0]), u_s[1]))(
              opt.update(jax.grad(_loss)(p, x, y), s, p)))
      worst = 0.0
      for t in range(STEPS):
        params, state = step(params, state)
        worst = max(worst, relative_error(
            params, _params(runs, f"{case}/free/param/{t}")))
      free = f"{worst:.1e}"
    print(f"| {case} | {lockstep:.1e} | {free} |")


if __name__ == "__main__":
  if len(sys.argv) > 1:
    _run_keras(sys.argv[1])
  else:
    _report()
  sys.exit(0)

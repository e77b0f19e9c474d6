"""Shared test helpers: small problems and a jitted training loop."""

import json
import os
import subprocess
import sys

# Some tests start JAX in a subprocess on the same device (a resumed run, the
# benchmark). On a GPU the first process would otherwise take 75% of the
# memory when its backend starts, and the second could not start; on a CPU
# this changes nothing. It must be set before JAX's backend starts.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp
import numpy as np
import optax

# Tests compare the flat path, the tree path, optax and NumPy at 1e-6 and
# below. GPUs multiply float32 matrices in TF32 by default, which moves the
# gradients of the test problems by ~1e-4 relative before any optimizer
# runs; full float32 products keep the comparisons about the optimizers.
# (On CPU this changes nothing: XLA:CPU multiplies in full float32.)
jax.config.update("jax_default_matmul_precision", "highest")


def train(opt, params, loss, steps):
  """Run ``steps`` jitted optimizer steps of ``opt`` on ``loss``."""
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def offload_supported():
  """Whether this JAX moves arrays to host memory inside jit here (JAX 0.8
  does not on CPU)."""
  import jadam  # pylint: disable=g-import-not-at-top
  try:
    jax.jit(jadam.sharding.offload(jadam.adam(1e-3)).init)({"w": jnp.ones(2)})
    return True
  except NotImplementedError:
    return False


def assert_bitwise(a, b):
  """Two pytrees with the same structure, dtypes, shapes and bytes."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


def run_json_worker(code, timeout=600):
  """Run ``code`` in a fresh Python (which sets its own XLA_FLAGS, e.g. a
  simulated device count, before importing JAX) and return the JSON object
  it prints last."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  done = subprocess.run([sys.executable, "-c", code], env=env,
                        capture_output=True, text=True, timeout=timeout,
                        check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


def relative_error(a, b):
  """‖a − b‖ / ‖b‖ over all leaves of two pytrees."""
  fa = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(a)])
  fb = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(b)])
  return float(np.linalg.norm(fa - fb) / max(np.linalg.norm(fb), 1e-30))


def _quadratic_problem():
  key = jax.random.PRNGKey(0)
  k1, k2 = jax.random.split(key)
  a = jax.random.normal(k1, (8, 8))
  h = a @ a.T / 8 + 0.1 * jnp.eye(8)
  target = jax.random.normal(k2, (8,))
  params = {"x": jnp.zeros(8), "y": jnp.ones((2, 3))}
  def loss(p):
    d = p["x"] - target
    return 0.5 * d @ h @ d + jnp.sum((p["y"] - 0.5) ** 4)
  return params, loss


def _rosenbrock_problem():
  params = [jnp.array([-1.2, 1.0, -0.5, 0.8])]
  def loss(p):
    x = p[0]
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)
  return params, loss


def _mlp_problem():
  key = jax.random.PRNGKey(1)
  kx, k1, k2 = jax.random.split(key, 3)
  x = jax.random.normal(kx, (64, 5))
  y = jnp.sin(x @ jnp.arange(1.0, 6.0) / 5)
  params = {"dense1": {"kernel": 0.5 * jax.random.normal(k1, (5, 16)),
                       "bias": jnp.zeros(16)},
            "dense2": {"kernel": 0.5 * jax.random.normal(k2, (16, 1)),
                       "bias": jnp.zeros(1)}}
  def loss(p):
    h = jnp.tanh(x @ p["dense1"]["kernel"] + p["dense1"]["bias"])
    out = (h @ p["dense2"]["kernel"] + p["dense2"]["bias"])[:, 0]
    return jnp.mean((out - y) ** 2)
  return params, loss


PROBLEMS = {
    "quadratic": _quadratic_problem,
    "rosenbrock": _rosenbrock_problem,
    "mlp": _mlp_problem,
}


# ---------------------------------------------------------------------------
# jadam's own code raises no deprecation warnings.
#
# A DeprecationWarning or FutureWarning emitted while a frame of the jadam
# package is on the stack is turned into an error, so that the next removal
# in JAX, optax or NumPy shows up here before users see it. The stack is
# inspected because libraries attribute their warnings to varying frames
# (``stacklevel``), often to their own array methods rather than to the
# caller. C-level warnings (NumPy's) are caught by the module filter in
# pyproject.toml instead.

import os as _os
import sys as _sys
import warnings as _warnings

_PACKAGE = _os.path.join(
    _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "jadam")
_DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def _jadam_frame_on_stack():
  frame = _sys._getframe(2)  # pylint: disable=protected-access
  while frame is not None:
    if frame.f_code.co_filename.startswith(_PACKAGE):
      return frame.f_code.co_filename, frame.f_lineno
    frame = frame.f_back
  return None


_plain_warn = _warnings.warn


def _warn(message, category=None, stacklevel=1, source=None, **kwargs):
  kind = category or (type(message) if isinstance(message, Warning)
                      else UserWarning)
  own = isinstance(message, str) and message.startswith("jadam: ")
  if issubclass(kind, _DEPRECATIONS) and not own:
    # jadam's own deprecations ("jadam: ..." old spellings that still work
    # for one release) are warnings; their tests use pytest.warns.
    where = _jadam_frame_on_stack()
    if where is not None:
      raise kind(f"{message} (raised under jadam code at "
                 f"{where[0]}:{where[1]})")
  return _plain_warn(message, category, stacklevel + 1, source, **kwargs)


_warnings.warn = _warn

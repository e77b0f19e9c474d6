"""jadam in float64 against independent NumPy transcriptions of the papers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam


def numpy_adam(theta, grad_fn, steps, alpha=1e-2, beta1=0.9, beta2=0.999,
               epsilon=1e-8):
  """Kingma & Ba (2015), Algorithm 1, line by line, in float64."""
  m = np.zeros_like(theta)            # Initialize 1st moment vector
  v = np.zeros_like(theta)            # Initialize 2nd moment vector
  t = 0                               # Initialize timestep
  for _ in range(steps):
    t = t + 1
    g = grad_fn(theta)                # Get gradients w.r.t. objective at t
    m = beta1 * m + (1 - beta1) * g   # Update biased first moment estimate
    v = beta2 * v + (1 - beta2) * g**2  # Update biased second raw moment
    m_hat = m / (1 - beta1**t)        # Bias-corrected first moment estimate
    v_hat = v / (1 - beta2**t)        # Bias-corrected second raw moment
    theta = theta - alpha * m_hat / (np.sqrt(v_hat) + epsilon)
  return theta


def numpy_adamax(theta, grad_fn, steps, alpha=2e-3, beta1=0.9, beta2=0.999,
                 epsilon=1e-8):
  """Kingma & Ba (2015), Algorithm 2 (with ε inside the max, as optax)."""
  m = np.zeros_like(theta)
  u = np.zeros_like(theta)
  for t in range(1, steps + 1):
    g = grad_fn(theta)
    m = beta1 * m + (1 - beta1) * g
    u = np.maximum(beta2 * u, np.abs(g) + epsilon)
    theta = theta - (alpha / (1 - beta1**t)) * m / u
  return theta


def _problem():
  """Least squares plus a quartic, with its gradient written out by hand."""
  rng = np.random.default_rng(0)
  a = rng.normal(size=(12, 6))
  b = rng.normal(size=12)
  grad_np = lambda th: a.T @ (a @ th - b) / 12 + 0.01 * th**3
  loss_jax = lambda th: (0.5 * jnp.sum((jnp.asarray(a) @ th - jnp.asarray(b)) ** 2) / 12
                         + 0.0025 * jnp.sum(th**4))
  return rng.normal(size=6), grad_np, loss_jax


@pytest.mark.parametrize("name,reference,lr", [
    ("adam", numpy_adam, 1e-2), ("adamax", numpy_adamax, 2e-3)])
def test_float64_matches_numpy_transcription(name, reference, lr):
  theta0, grad_np, loss_jax = _problem()
  expected = reference(theta0.copy(), grad_np, 500, alpha=lr)
  with jax.enable_x64(True):
    opt = getattr(jadam, name)(lr)
    theta = jnp.asarray(theta0, jnp.float64)
    state = opt.init(theta)
    step = jax.jit(lambda th, s: opt.update(jax.grad(loss_jax)(th), s, th))
    for _ in range(500):
      updates, state = step(theta, state)
      theta = optax.apply_updates(theta, updates)
    assert theta.dtype == jnp.float64
    assert state[0].mu.dtype == jnp.float64
    got = np.asarray(theta)
  # float64 all the way: agreement far beyond float32's 1e-7.
  np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
  assert np.linalg.norm(expected - theta0) > 0.1  # the run moved


def test_first_step_is_alpha_times_sign():
  # With m̂_1 = g and v̂_1 = g², the first step is −α·g/(|g| + ε) ≈ −α·sign(g).
  g = np.array([3.0, -1e-3, 0.0])
  expected = -0.1 * g / (np.abs(g) + 1e-8)
  with jax.enable_x64(True):
    opt = jadam.adam(0.1)
    g = jnp.asarray(g, jnp.float64)
    updates, _ = opt.update(g, opt.init(jnp.zeros(3, jnp.float64)))
    np.testing.assert_allclose(updates, expected, rtol=1e-12)
  # In float32, β2 = 0.999 rounds to 0.99900001, so 1 − β2^t carries a
  # relative error of 1.3e-5 that (1 − β2) = 0.001 does not: optax and jadam
  # both take a first step 6.6e-6 short of α. jadam keeps optax's arithmetic.
  opt = jadam.adam(0.1)
  updates, _ = opt.update(jnp.array([3.0, -1e-3, 0.0]), opt.init(jnp.zeros(3)))
  np.testing.assert_allclose(updates, expected, rtol=1e-5)

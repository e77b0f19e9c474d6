"""int8 moments on the data that breaks block-wise quantization.

Each test compares with float32 moments on one hard case, with a tolerance
taken from the measurement stated beside it (Python 3.11, JAX 0.10.2, CPU).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam

INT8 = jadam.BlockwiseInt8(min_size=0)
N = 4096


def _directions(nu_dtype, grads):
  tx = jadam.scale_by_adam(nu_dtype=nu_dtype)
  state = tx.init({"w": jnp.zeros(N)})
  update = jax.jit(tx.update)
  out = []
  for g in grads:
    u, state = update({"w": jnp.asarray(g)}, state)
    out.append(np.asarray(u["w"]))
  return np.array(out)


def test_an_outlier_does_not_make_its_block_mates_step_too_far():
  # Element 0 of every 256-element block is 3e4 times its block-mates, so
  # their v is 9e8 times smaller than the block's largest. The uint8 codes
  # hold √v (a ratio of 3e4, inside the code map's 19.6 octaves), so the
  # block-mates keep their own second moments. Measured over 200 steps:
  # the largest block-mate step is at most 1.55x the largest float32 one,
  # the RMS step 1.00-1.03x, the median element within 9.3% of its float32
  # step (99th percentile 37%). Before (codes of v, floored at the map's
  # smallest point): 1.02x, but an RMS step of 0.12x; before that (flushed
  # to zero): 36,588x and 488x. The largest step is the tail of the
  # rounding: over the gradient seeds 0-3 it ranged 1.33-1.54x with one
  # stream for all leaves and 1.36-1.55x with a stream per leaf (median
  # block-mate 1.08-1.12x either way).
  rng = np.random.default_rng(0)
  grads = []
  for _ in range(200):
    g = rng.standard_normal(N).astype(np.float32) * 1e-3
    g[::256] *= 3e4
    grads.append(g)
  exact, int8 = _directions(None, grads), _directions(INT8, grads)
  mates = np.ones(N, bool)
  mates[::256] = False
  largest = (np.abs(int8[:, mates]).max(axis=1)
             / np.abs(exact[:, mates]).max(axis=1))
  assert largest.max() < 1.7
  rms = lambda d: np.sqrt(np.mean(d[:, mates] ** 2, axis=1))
  ratio = rms(int8) / rms(exact)
  assert 0.95 < ratio.min() and ratio.max() < 1.1
  relative = np.abs(int8[:, mates] - exact[:, mates]) / np.abs(exact[:, mates])
  assert np.median(relative) < 0.12
  # The outliers themselves step as with float32 moments.
  np.testing.assert_allclose(int8[:, ~mates], exact[:, ~mates], rtol=0.1)


@pytest.mark.parametrize("nu_dtype", [None, "bfloat16", INT8])
def test_a_gradient_whose_square_overflows_leaves_parameters_finite(nu_dtype):
  # |g| = 3e19: g² overflows float32. float32 moments keep v = inf and a zero
  # step for that element; int8 now stores v = +inf in a code of its own and
  # sets the block scale without it, so its 255 block-mates step as with
  # float32 (before: the NaN code, and the parameter became NaN).
  tx = jadam.adam(1e-3, nu_dtype=nu_dtype)
  params = {"w": jnp.ones(N)}
  state = tx.init(params)
  for g in (jnp.full(N, 1e-3).at[5].set(3e19), jnp.full(N, 1e-3)):
    updates, state = tx.update({"w": g}, state, params)
    params = optax.apply_updates(params, updates)
  assert np.all(np.isfinite(np.asarray(params["w"])))
  # The overflowing element does not move (v is infinite, or saturated),
  # and the others took two ordinary steps.
  assert float(params["w"][5]) == pytest.approx(1.0, abs=1e-6)
  assert float(params["w"][0]) == pytest.approx(1 - 2e-3, rel=1e-3)


def test_skip_nonfinite_catches_what_float32_would_make_nonfinite():
  # An infinite gradient makes a float32-moment step NaN; under
  # skip_nonfinite the int8 step is skipped with codes and scales unchanged.
  tx = jadam.skip_nonfinite(jadam.adam(1e-3, nu_dtype=INT8))
  params = {"w": jnp.ones(N)}
  state = tx.init(params)
  _, state = tx.update({"w": jnp.full(N, 0.1)}, state, params)
  updates, new = tx.update({"w": jnp.full(N, 0.1).at[3].set(jnp.inf)}, state,
                           params)
  assert not np.any(np.asarray(updates["w"]))
  for a, b in zip(jax.tree.leaves(new.inner_state),
                  jax.tree.leaves(state.inner_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_amsgrad_running_maximum_never_decreases_with_int8():
  # Measured before the fix: 0.5% of element-steps decreased, by up to 9.7%.
  # The maximum is now rounded up when stored.
  tx = jadam.scale_by_amsgrad(nu_dtype=INT8)
  state = tx.init({"w": jnp.zeros(N)})
  update = jax.jit(tx.update)
  rng = np.random.default_rng(1)
  previous = None
  for _ in range(200):
    g = (rng.standard_normal(N) * np.exp(2 * rng.standard_normal())).astype(
        np.float32)
    _, state = update({"w": jnp.asarray(g)}, state)
    current = np.asarray(jadam.decode_moments(state).nu_max["w"])
    if previous is not None:
      assert np.all(current >= previous)
    previous = current


# ---------------------------------------------------------------------------
# Training quality against float32 moments. Tolerances are about 1.3x the
# values measured (Python 3.11, JAX 0.10.2, CPU), stated beside each.
# ---------------------------------------------------------------------------

V, D, B, ZIPF_STEPS = 512, 32, 32, 600


def _zipf_embedding(**moments):
  """An embedding table fitted to targets through Zipf-distributed tokens:
  final rows, and how often each row was drawn."""
  rng = np.random.default_rng(0)
  p = 1.0 / np.arange(1, V + 1)
  tokens = rng.choice(V, size=(ZIPF_STEPS, B), p=p / p.sum())
  target = jax.random.normal(jax.random.PRNGKey(1), (V, D)) * 0.1
  opt = jadam.adam(1e-2, **moments)

  def body(carry, tok):
    params, state = carry
    grads = jax.grad(
        lambda q: jnp.mean((q["emb"][tok] - target[tok]) ** 2))(params)
    updates, state = opt.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), None

  params = {"emb": jnp.zeros((V, D))}
  (params, _), _ = jax.jit(lambda p, s: jax.lax.scan(body, (p, s), tokens))(
      params, opt.init(params))
  return np.asarray(params["emb"]), np.bincount(tokens.ravel(), minlength=V)


def test_zipf_embedding_rows_track_float32_moments():
  # Relative distance of each row from the float32-moment run, averaged over
  # rare rows (drawn at most 3 times in 19,200 draws) and the middle rows
  # (4-60 draws). Measured (JAX 0.10.2): bfloat16 0.011 and 0.032; int8
  # with a block per row of 32 (the default, row_blocks) 0.042 and 0.079;
  # int8 with blocks of 256 spanning 8 rows 0.055 and 0.111, and 0.046 and
  # 0.091 when those blocks are scaled by their exact maxima (which cost 3x
  # the int8 step on this CPU; see docs/memory.md). The target: no worse
  # than exact maxima.
  reference, counts = _zipf_embedding()
  rare, middle = counts <= 3, (counts > 3) & (counts <= 60)
  assert rare.sum() >= 10 and middle.sum() >= 200

  def errors(**moments):
    rows, _ = _zipf_embedding(**moments)
    err = (np.linalg.norm(rows - reference, axis=1)
           / np.linalg.norm(reference, axis=1))
    return err[rare].mean(), err[middle].mean()

  bf16 = errors(mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)
  int8 = errors(mu_dtype="int8", nu_dtype="int8")
  spanning = jadam.BlockwiseInt8(row_blocks=False)
  int8_spanning = errors(mu_dtype=spanning, nu_dtype=spanning)
  assert bf16[0] < 0.015 and bf16[1] < 0.042
  assert int8[0] < 0.046 and int8[1] < 0.091  # exact maxima's errors
  assert int8[0] < 0.85 * int8_spanning[0]
  assert int8[1] < 0.8 * int8_spanning[1]


def test_blocks_do_not_span_rows_shorter_than_a_block():
  fmt = jadam.BlockwiseInt8()
  assert fmt.block_for((512, 32)) == 32
  assert fmt.block_for((100, 96)) == 32   # 96 = 3 · 32
  assert fmt.block_for((1000, 100)) == 256  # 4 divides 100: too small
  assert fmt.block_for((64, 768)) == 256   # rows of whole blocks already
  assert fmt.block_for((16384,)) == 256
  assert jadam.BlockwiseInt8(row_blocks=False).block_for((512, 32)) == 256
  state = jadam.scale_by_adam(mu_dtype="int8", nu_dtype="int8").init(
      {"emb": jnp.zeros((512, 32)), "w": jnp.zeros((64, 768))})
  assert state.mu["emb"].scales.shape == (512,)   # one scale per row
  assert state.nu["w"].scales.shape == (192,)
  # A state with blocks spanning rows (an earlier release's checkpoint) is
  # not stepped as if it had this optimizer's blocks: the update names the
  # mismatch and the conversion, which gives a state that steps as the
  # spanning optimizer steps its own.
  old = jadam.scale_by_adam(mu_dtype=jadam.BlockwiseInt8(row_blocks=False),
                            nu_dtype=jadam.BlockwiseInt8(row_blocks=False))
  params = {"emb": jnp.ones((512, 32))}
  old_state = old.init(params)
  assert old_state.mu["emb"].scales.shape == (64,)
  new = jadam.scale_by_adam(mu_dtype="int8", nu_dtype="int8")
  grads = {"emb": jnp.linspace(-1, 1, 512 * 32).reshape(512, 32)}
  with pytest.raises(ValueError, match=r"block 256.*block 32.*convert_state"):
    new.update(grads, old_state)
  converted = jadam.convert_state(old_state, new, params)
  assert converted.mu["emb"].scales.shape == (512,)
  updates, stepped = new.update(grads, converted)
  expected, _ = old.update(grads, old_state)
  np.testing.assert_array_equal(updates["emb"], expected["emb"])
  assert stepped.mu["emb"].scales.shape == (512,)


def test_gradients_over_six_decades_in_a_block_track_float32_moments():
  # Each element's gradient scale is fixed, log-uniform over 1e-3..1e3, so
  # every block mixes six decades (v: twelve). Distance of the parameters
  # from the float32-moment run after 300 noisy steps, relative to their
  # movement. Measured: bfloat16 0.0016; int8 0.038 (0.49 when the codes
  # held v rather than √v: the smaller elements fell off the code map).
  n, steps = 8192, 300
  rng = np.random.default_rng(0)
  scale = jnp.asarray(10.0 ** rng.uniform(-3, 3, n), jnp.float32)
  noise = jnp.asarray(rng.standard_normal((steps, n)), jnp.float32)
  target = jnp.asarray(rng.standard_normal(n), jnp.float32)

  def run(**moments):
    opt = jadam.adam(1e-2, **moments)

    def body(carry, z):
      params, state = carry
      grads = {"w": scale * ((params["w"] - target) + 0.3 * z)}
      updates, state = opt.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None

    params = {"w": jnp.zeros(n)}
    (params, _), _ = jax.jit(lambda p, s: jax.lax.scan(body, (p, s), noise))(
        params, opt.init(params))
    return np.asarray(params["w"])

  reference = run()
  distance = lambda w: np.linalg.norm(w - reference) / np.linalg.norm(reference)
  assert distance(run(mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)) < 0.003
  assert distance(run(mu_dtype="int8", nu_dtype="int8")) < 0.05

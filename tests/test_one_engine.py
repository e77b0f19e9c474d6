"""One engine: every optimizer walks the tree once, through one codec.

ADOPT, AdEMAMix and schedule-free AdamW are per-array steps handed to the same
walk (``jadam._engine.walk``) and codec (``jadam._engine.step_leaf``) as
the Adam family, so a storage option means one algorithm whatever the
optimizer: the same random streams, the same int8 scales, the same in-pass
skip.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
from conftest import assert_bitwise  # pylint: disable=g-bad-import-order
from jadam._formats import _codes as _quant

STORAGES = {
    "float32": {},
    "bfloat16": dict(mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
    "float16": dict(mu_dtype=jnp.float16, nu_dtype=jnp.float16),
    "int8": dict(mu_dtype="int8", nu_dtype="int8"),
}

# Large enough for int8 blocks (and several of them), with one small leaf
# that int8 leaves in float32.
PARAMS = {"w": jnp.zeros((8, 1024)), "b": jnp.zeros((7,))}


def _grads(step):
  key = jax.random.PRNGKey(step)
  return jax.tree.map(
      lambda p: jax.random.normal(key, p.shape) * 10.0 ** (step % 3 - 1),
      PARAMS)


def _run(tx, steps=5, poison_at=None):
  state = tx.init(PARAMS)
  update = jax.jit(tx.update)
  for step in range(steps):
    grads = _grads(step)
    if step == poison_at:
      grads = {**grads, "b": grads["b"].at[0].set(jnp.nan)}
    _, state = update(grads, state, PARAMS)
  return state




@pytest.mark.parametrize("storage", STORAGES)
def test_ademamix_keeps_adams_moments_exactly_as_adam_does(storage):
  """AdEMAMix's m1 and v follow Adam's recurrences; through the one engine
  they are stored bit for bit as jadam.adam stores m and v, in every format
  (rounding streams and int8 scales included), skipped step included."""
  kw = STORAGES[storage]
  adam = jadam.skip_nonfinite(jadam.scale_by_adam(**kw))
  ademamix = jadam.skip_nonfinite(jadam.contrib.scale_by_ademamix(**kw))
  adam_state = _run(adam, poison_at=2).inner_state
  mix_state = _run(ademamix, poison_at=2).inner_state
  assert_bitwise(adam_state.mu, mix_state.m1)
  assert_bitwise(adam_state.nu, mix_state.nu)
  assert int(adam_state.count) == int(mix_state.count) == 4
  if storage == "int8":
    # The int8 scales travel inside the moments' leaves; compare them apart
    # too, so that the check names them.
    for adam_tree, mix_tree in ((adam_state.mu, mix_state.m1),
                                (adam_state.nu, mix_state.nu)):
      assert isinstance(adam_tree["w"], jadam.Int8Moment)
      assert isinstance(mix_tree["w"], jadam.Int8Moment)
      assert_bitwise(adam_tree["w"].scales, mix_tree["w"].scales)


VARIANTS = {
    "adopt": jadam.contrib.scale_by_adopt,
    "ademamix": jadam.contrib.scale_by_ademamix,
}


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("name", VARIANTS)
def test_variants_skip_in_place_through_the_update_argument(name, storage):
  """``jadam_skip=True`` (what skip_nonfinite passes): zero direction,
  count and every stored moment and scale bitwise unchanged, for the
  variants as for the Adam family."""
  tx = VARIANTS[name](**STORAGES[storage])
  state = _run(tx, steps=3)
  grads = _grads(7)
  out, skipped = jax.jit(lambda g, s: tx.update(
      g, s, jadam_skip=jnp.asarray(True)))(grads, state)
  assert_bitwise(skipped, state)
  for leaf in jax.tree.leaves(out):
    np.testing.assert_array_equal(np.asarray(leaf), 0)
  _, taken = jax.jit(lambda g, s: tx.update(
      g, s, jadam_skip=jnp.asarray(False)))(grads, state)
  _, plain = jax.jit(tx.update)(grads, state)
  assert_bitwise(taken, plain)
  assert int(taken.count) == int(state.count) + 1


def _block_max(decoded, block):
  flat = np.abs(np.asarray(decoded, np.float64)).reshape(-1)
  return flat.reshape(-1, block).max(axis=1)


@pytest.mark.parametrize("name, field, exact", [
    ("adam", "mu", False), ("adam", "nu", False),
    ("ademamix", "m1", False), ("ademamix", "m2", True),
    ("ademamix", "nu", False), ("adopt", "mu", True), ("adopt", "nu", False),
])
def test_int8_scales_are_bounds_or_exact_maxima(name, field, exact):
  """One int8 policy, decided by the recurrence: a block's scale is an upper
  bound set in advance where the recurrence gives one (every decoded value
  within it), and the exact maximum of the new values where it does not
  (the largest element of each block decodes to the scale itself)."""
  make = {"adam": jadam.scale_by_adam, **VARIANTS}[name]
  state = _run(make(mu_dtype="int8", nu_dtype="int8"), steps=6)
  moment = getattr(state, field)["w"]
  assert isinstance(moment, jadam.Int8Moment)
  codes, scales = moment.codes, moment.scales
  assert codes.dtype in (jnp.int8, jnp.uint8)
  decoded = _quant.dequantize(codes, scales)
  block = codes.size // scales.shape[0]
  top = _block_max(decoded, block)
  scales = np.asarray(scales, np.float64)
  assert np.all(top <= scales * (1 + 1e-6))
  if exact:
    np.testing.assert_allclose(top, scales, rtol=1e-6)
  else:
    # Bounds sit above the maxima (by the gradient's block maximum over the
    # moment's) for m; v's bound is close, as |g|² does not cancel.
    assert np.median(scales / top) > 1.0


def test_schedule_free_base_skips_through_skip_nonfinite():
  """Schedule-free AdamW under skip_nonfinite: a non-finite gradient leaves
  the whole state (z, its base step's v codes and scales) as it was."""
  tx = jadam.skip_nonfinite(jadam.contrib.schedule_free_adamw(1e-2, nu_dtype="int8"))
  state = tx.init(PARAMS)
  update = jax.jit(tx.update)
  params = PARAMS
  for step in range(3):
    updates, state = update(_grads(step), state, params)
    params = optax.apply_updates(params, updates)
  bad = {**_grads(5), "w": _grads(5)["w"].at[0, 0].set(jnp.inf)}
  updates, after = update(bad, state, params)
  assert_bitwise(after.inner_state, state.inner_state)
  for leaf in jax.tree.leaves(updates):
    np.testing.assert_array_equal(np.asarray(leaf), 0)

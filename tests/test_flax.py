"""jadam inside Flax: NNX's ``nnx.Optimizer`` and Linen's ``TrainState``."""

import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax import traverse_util
from flax.training import train_state

import jadam
from conftest import relative_error

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

LR, WD = 0.1, 0.5


def _batch(n=16, d=6, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  return x, rng.integers(0, classes, n).astype(np.int32)


def _kernels_only(params):
  # NNX keeps each array under the variable's ``.value``; Linen's key is last.
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(getattr(k, "key", None) == "kernel" for k in path),
      params)


def _names(tree):
  return [jax.tree_util.keystr(p) for p, _ in
          jax.tree_util.tree_leaves_with_path(tree)]


# --- NNX ---------------------------------------------------------------------

class NnxNet(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(6, 8, rngs=rngs)
    self.norm = nnx.LayerNorm(8, rngs=rngs)
    self.out = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.norm(self.hidden(x))))


def _nnx_loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _params_copy(model):
  return jax.tree.map(np.array, nnx.state(model, nnx.Param))


def test_nnx_weight_decay_mask_hits_kernels_only():
  model = NnxNet(nnx.Rngs(0))
  # Give the norm non-trivial parameters so "unchanged" is not vacuous.
  model.norm.scale.value = jnp.full(8, 2.0)
  model.norm.bias.value = jnp.full(8, 0.5)
  optimizer = nnx.Optimizer(
      model, jadam.adamw(LR, weight_decay=WD, mask=_kernels_only),
      wrt=nnx.Param)
  before = _params_copy(model)
  # With zero gradients Adam's direction is exactly 0, so the whole update is
  # the decoupled decay −α·λ·θ where the mask is True and nothing elsewhere.
  zeros = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
  optimizer.update(model, zeros)
  after = _params_copy(model)
  decayed = []
  for name, b, a in zip(_names(before), jax.tree.leaves(before),
                        jax.tree.leaves(after)):
    if "kernel" in name:
      decayed.append(name)
      np.testing.assert_allclose(a, (1 - LR * WD) * b, rtol=1e-6, atol=1e-8)
      assert np.abs(a - b).max() > 1e-3
    else:
      np.testing.assert_array_equal(a, b)
  assert sorted(decayed) == ["['hidden']['kernel'].value",
                             "['out']['kernel'].value"]


def test_nnx_adamw_with_mask_matches_optax_adamw():
  x, y = _batch()
  results = []
  for tx in (jadam.adamw(3e-2, weight_decay=0.1, mask=_kernels_only),
             optax.adamw(3e-2, weight_decay=0.1, mask=_kernels_only)):
    model = NnxNet(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
      loss, grads = nnx.value_and_grad(_nnx_loss)(model, x, y)
      optimizer.update(model, grads)
      return loss

    losses = [float(step(model, optimizer)) for _ in range(25)]
    results.append((_params_copy(model), losses, int(optimizer.step[...])))
  (ours, our_losses, our_steps), (theirs, their_losses, _) = results
  assert our_steps == 25
  assert our_losses[-1] < 0.5 * our_losses[0]
  np.testing.assert_allclose(our_losses, their_losses, rtol=1e-5)
  assert relative_error(ours, theirs) < 1e-6


def test_nnx_optimizer_state_is_jadam_state_over_params_only():
  model = NnxNet(nnx.Rngs(0))
  model.counter = nnx.BatchStat(jnp.zeros(()))  # not a Param: no moments
  optimizer = nnx.Optimizer(model, jadam.adam(1e-3), wrt=nnx.Param)
  adam_state = optimizer.opt_state[0]
  assert isinstance(adam_state, jadam.ScaleByAdamState)
  assert sorted(_names(adam_state.mu)) == sorted(
      _names(nnx.state(model, nnx.Param)))
  assert not any("counter" in n for n in _names(adam_state.nu))


# --- Linen -------------------------------------------------------------------

class LinenNet(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = True):
    # No bias before BatchNorm: it would cancel, leaving a parameter whose
    # gradient is rounding noise that Adam normalises into full-size steps.
    x = nn.Dense(8, use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.Dense(3)(nn.relu(x))


class StateWithStats(train_state.TrainState):
  batch_stats: dict


def _linen_state(tx):
  model = LinenNet()
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 6)), train=False)
  return StateWithStats.create(apply_fn=model.apply, params=variables["params"],
                               batch_stats=variables["batch_stats"], tx=tx)


@jax.jit
def _linen_step(state, x, y):
  def loss_fn(params):
    logits, new = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, x,
        mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, new["batch_stats"]
  (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads=grads, batch_stats=stats), loss


def test_linen_train_state_with_jadam_adam_matches_optax_adam():
  x, y = _batch()
  runs = []
  for tx in (jadam.adam(3e-2), optax.adam(3e-2)):
    state = _linen_state(tx)
    losses = []
    for _ in range(25):
      state, loss = _linen_step(state, x, y)
      losses.append(float(loss))
    runs.append((state, losses))
  (ours, our_losses), (theirs, their_losses) = runs
  assert int(ours.step) == 25
  assert isinstance(ours.opt_state[0], jadam.ScaleByAdamState)
  assert our_losses[-1] < 0.5 * our_losses[0]
  np.testing.assert_allclose(our_losses, their_losses, rtol=1e-5)
  assert relative_error(ours.params, theirs.params) < 1e-6
  # The running statistics follow the same trajectory too.
  assert relative_error(ours.batch_stats, theirs.batch_stats) < 1e-6


def test_linen_mask_decays_dense_kernels_not_biases_or_batchnorm():
  mask = lambda p: traverse_util.path_aware_map(  # noqa: E731
      lambda path, _: path[-1] == "kernel", p)
  state = _linen_state(jadam.adamw(LR, weight_decay=WD, mask=mask))
  state = state.replace(params=jax.tree.map(lambda p: p + 0.25, state.params))
  before = jax.tree.map(np.array, state.params)
  zeros = jax.tree.map(jnp.zeros_like, state.params)
  after = jax.tree.map(np.array, state.apply_gradients(grads=zeros).params)
  flat_before = traverse_util.flatten_dict(before, sep="/")
  flat_after = traverse_util.flatten_dict(after, sep="/")
  assert sorted(flat_before) == [
      "BatchNorm_0/bias", "BatchNorm_0/scale", "Dense_0/kernel", "Dense_1/bias", "Dense_1/kernel"]
  for name, b in flat_before.items():
    if name.endswith("kernel"):
      np.testing.assert_allclose(flat_after[name], (1 - LR * WD) * b, rtol=1e-6)
    else:
      np.testing.assert_array_equal(flat_after[name], b)


def test_linen_adamw_with_mask_matches_optax_adamw():
  x, y = _batch(seed=1)
  mask = lambda p: traverse_util.path_aware_map(  # noqa: E731
      lambda path, _: path[-1] == "kernel", p)
  finals = []
  for make in (jadam.adamw, optax.adamw):
    state = _linen_state(make(1e-2, weight_decay=0.1, mask=mask))
    for _ in range(25):
      state, _ = _linen_step(state, x, y)
    finals.append(state.params)
  assert relative_error(*finals) < 1e-6


# --- Examples ----------------------------------------------------------------

def test_flax_nnx_example_learns_digits(capsys):
  import flax_nnx
  history = flax_nnx.main(["--epochs", "2"])
  out = capsys.readouterr().out
  assert "Epoch 2, Loss:" in out
  assert history["loss"][1] < history["loss"][0]
  assert history["test_accuracy"][-1] > 0.85


def test_flax_linen_example_learns_digits(capsys):
  import flax_linen
  history = flax_linen.main(["--epochs", "2"])
  out = capsys.readouterr().out
  assert "Epoch 2, Loss:" in out
  assert history["loss"][1] < history["loss"][0]
  assert history["test_accuracy"][-1] > 0.85


def test_nnx_optimizer_step_counts_skipped_steps_and_the_state_does_not():
  """nnx.Optimizer's own step counts every update; under skip_nonfinite the
  optimizer state's count and skipped counter say what happened
  (docs/reliability.md)."""
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, jadam.skip_nonfinite(jadam.adam(1e-2)),
                            wrt=nnx.Param)
  x = jnp.ones((4, 3))
  for scale in (1.0, jnp.nan, 1.0):
    grads = nnx.grad(lambda m, s=scale: jnp.mean(m(x) * s))(model)
    optimizer.update(model, grads)
  assert int(optimizer.step[...]) == 3
  assert int(optimizer.opt_state.inner_state[0].count[...]) == 2
  assert int(optimizer.opt_state.skipped[...]) == 1

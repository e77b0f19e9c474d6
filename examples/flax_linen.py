"""Flax Linen with jadam: a digits classifier kept in a ``TrainState``.

Dense(128, no bias) → BatchNorm → ReLU → Dense(10) on scikit-learn's 8×8 digits. The
optimizer goes into ``TrainState.create(tx=...)`` like any optax optimizer:

    tx = jadam.adamw(schedule, weight_decay=1e-2, mask=decay_mask)

``decay_mask`` decays the Dense kernels only, not the biases or the
BatchNorm scale and offset. BatchNorm's running statistics live next to the
parameters in the state and are never seen by the optimizer.

Run: python examples/flax_linen.py   (how long: docs/durations.md)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from flax.training import train_state
from tqdm import tqdm

import jadam
# The same data split, command line and schedule as the NNX example.
from flax_nnx import load_digits_split, parse_args, warmup_cosine


def decay_mask(params):
  """True for Dense kernels; False for biases and BatchNorm scale/bias."""
  return traverse_util.path_aware_map(lambda path, _: path[-1] == "kernel",
                                      params)


class Classifier(nn.Module):
  hidden: int = 128
  n_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool):
    # BatchNorm subtracts the mean, so a bias before it would have no effect.
    x = nn.Dense(self.hidden, use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(self.n_classes)(nn.relu(x))


class TrainState(train_state.TrainState):
  batch_stats: Any


def create_state(tx: optax.GradientTransformation, n_features: int = 64,
                 seed: int = 0) -> TrainState:
  model = Classifier()
  variables = model.init(jax.random.PRNGKey(seed),
                         jnp.zeros((1, n_features)), train=False)
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           batch_stats=variables["batch_stats"], tx=tx)


@jax.jit
def train_step(state: TrainState, x, y):
  def loss_fn(params):
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, x, train=True,
        mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, updates["batch_stats"]
  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  return state, loss


@jax.jit
def accuracy(state: TrainState, x, y):
  logits = state.apply_fn({"params": state.params,
                           "batch_stats": state.batch_stats}, x, train=False)
  return jnp.mean(jnp.argmax(logits, -1) == y)


def main(argv=None) -> dict:
  args = parse_args(argv, __doc__.splitlines()[0])
  x_train, y_train, x_test, y_test = load_digits_split(args.seed)
  steps_per_epoch = len(x_train) // args.batch_size
  schedule = warmup_cosine(args, steps_per_epoch)
  tx = jadam.adamw(schedule, weight_decay=args.weight_decay, mask=decay_mask)
  state = create_state(tx, x_train.shape[1], args.seed)

  rng = np.random.default_rng(args.seed)
  history = {"loss": [], "test_accuracy": []}
  for epoch in range(1, args.epochs + 1):
    order = rng.permutation(len(x_train))
    losses = []
    for i in tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{args.epochs}",
                  leave=False, unit="batch"):
      batch = order[i * args.batch_size:(i + 1) * args.batch_size]
      state, loss = train_step(state, x_train[batch], y_train[batch])
      losses.append(float(loss))
    history["loss"].append(float(np.mean(losses)))
    history["test_accuracy"].append(float(accuracy(state, x_test, y_test)))
    print(f"Epoch {epoch}, Loss: {history['loss'][-1]:.4f}, "
          f"test accuracy: {100 * history['test_accuracy'][-1]:.2f}%", flush=True)
  return history


if __name__ == "__main__":
  main()

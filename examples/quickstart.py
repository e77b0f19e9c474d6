"""jadam quickstart: a small Flax regression model trained with Adam.

Dense(32, relu) -> Dropout(0.2) -> Dense(1), mean squared error, on a
regression data set generated here, 10 epochs at batch 32, with

    optax.chain(optax.clip_by_global_norm(1.0), jadam.scale_by_adam(),
                optax.scale_by_learning_rate(schedule))

Run: python examples/quickstart.py   (how long: docs/durations.md)
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import jadam


def make_regression(n_samples: int = 4096, n_features: int = 8, seed: int = 0):
  """A smooth nonlinear target with noise: y = sin(x·w) + 0.5·(x·u)² + noise."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n_samples, n_features)).astype(np.float32)
  w = rng.normal(size=n_features) / np.sqrt(n_features)
  u = rng.normal(size=n_features) / np.sqrt(n_features)
  y = np.sin(x @ w) + 0.5 * (x @ u) ** 2 + 0.1 * rng.normal(size=n_samples)
  return x, y.astype(np.float32)[:, None]


class Regressor(nnx.Module):
  """Dense(32, relu) -> Dropout(0.2) -> Dense(1)."""

  def __init__(self, n_features: int, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(n_features, 32, rngs=rngs)
    self.dropout = nnx.Dropout(0.2, rngs=rngs)
    self.out = nnx.Linear(32, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(self.dropout(nnx.relu(self.hidden(x))))


def mse(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


@nnx.jit
def train_step(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(mse)(model, x, y)
  optimizer.update(model, grads)
  return loss


def main(argv=None) -> list[float]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=10)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--learning-rate", type=float, default=3e-3)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  device = jax.devices()[0]
  print(f"JAX {jax.__version__} on {device.platform} ({device.device_kind})",
        flush=True)
  x, y = make_regression(seed=args.seed)
  steps_per_epoch = len(x) // args.batch_size
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=args.learning_rate,
      warmup_steps=steps_per_epoch // 2,
      decay_steps=args.epochs * steps_per_epoch, end_value=args.learning_rate / 20)
  tx = optax.chain(
      optax.clip_by_global_norm(1.0),
      jadam.scale_by_adam(),
      optax.scale_by_learning_rate(schedule),
  )
  model = Regressor(x.shape[1], nnx.Rngs(params=args.seed, dropout=args.seed + 1))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  rng = np.random.default_rng(args.seed)
  epoch_losses = []
  for epoch in range(1, args.epochs + 1):
    order = rng.permutation(len(x))
    losses = []
    model.train()
    for i in tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{args.epochs}",
                  leave=False, unit="batch"):
      batch = order[i * args.batch_size:(i + 1) * args.batch_size]
      losses.append(float(train_step(model, optimizer, x[batch], y[batch])))
    epoch_losses.append(float(np.mean(losses)))
    print(f"Epoch {epoch}, Loss: {epoch_losses[-1]:.4f}", flush=True)
  model.eval()
  print(f"Full-data MSE (dropout off): {float(mse(model, x, y)):.4f}")
  return epoch_losses


if __name__ == "__main__":
  main()

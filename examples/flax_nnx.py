"""Flax NNX with jadam: a digits classifier trained by ``nnx.Optimizer``.

Linear(64→128) → LayerNorm → ReLU → Dropout(0.1) → Linear(128→10) on
scikit-learn's 8×8 digits, trained with

    nnx.Optimizer(model, jadam.adamw(schedule, weight_decay=1e-2,
                                     mask=decay_mask), wrt=nnx.Param)

where ``decay_mask`` applies weight decay to the two kernels only, not to
the biases or the LayerNorm scale and offset.

Run: python examples/flax_nnx.py   (how long: docs/durations.md)
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


def load_digits_split(seed: int = 0):
  """Digits as float32 features standardised on the training split."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split
  x, y = load_digits(return_X_y=True)
  x_train, x_test, y_train, y_test = train_test_split(
      x, y, test_size=0.2, random_state=seed, stratify=y)
  mean, std = x_train.mean(0), x_train.std(0) + 1e-6
  scale = lambda a: ((a - mean) / std).astype(np.float32)  # noqa: E731
  return scale(x_train), y_train.astype(np.int32), scale(x_test), y_test.astype(np.int32)


def decay_mask(params):
  """True for kernels; biases and normalisation parameters are not decayed.

  NNX states hold each array under ``.value`` of its variable, so the name is
  looked up anywhere on the path rather than only in the last key.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(getattr(k, "key", None) == "kernel" for k in path),
      params)


class Classifier(nnx.Module):
  """Linear → LayerNorm → ReLU → Dropout → Linear."""

  def __init__(self, n_in: int, n_hidden: int, n_classes: int,
               rngs: nnx.Rngs):
    self.hidden = nnx.Linear(n_in, n_hidden, rngs=rngs)
    self.norm = nnx.LayerNorm(n_hidden, rngs=rngs)
    self.dropout = nnx.Dropout(0.1, rngs=rngs)
    self.out = nnx.Linear(n_hidden, n_classes, rngs=rngs)

  def __call__(self, x):
    return self.out(self.dropout(nnx.relu(self.norm(self.hidden(x)))))


def cross_entropy(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def train_step(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(cross_entropy)(model, x, y)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def accuracy(model, x, y):
  return jnp.mean(jnp.argmax(model(x), -1) == y)


def parse_args(argv, description: str) -> argparse.Namespace:
  """The command line shared by the Flax examples."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--epochs", type=int, default=10)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--learning-rate", type=float, default=3e-3)
  parser.add_argument("--weight-decay", type=float, default=1e-2)
  parser.add_argument("--seed", type=int, default=0)
  return parser.parse_args(argv)


def warmup_cosine(args: argparse.Namespace, steps_per_epoch: int):
  """Warm up for one epoch (half the run if it is one epoch), then cosine."""
  return optax.warmup_cosine_decay_schedule(
      0.0, args.learning_rate,
      warmup_steps=min(steps_per_epoch, args.epochs * steps_per_epoch // 2),
      decay_steps=args.epochs * steps_per_epoch)


def main(argv=None) -> dict:
  args = parse_args(argv, __doc__.splitlines()[0])
  x_train, y_train, x_test, y_test = load_digits_split(args.seed)
  steps_per_epoch = len(x_train) // args.batch_size
  schedule = warmup_cosine(args, steps_per_epoch)
  model = Classifier(x_train.shape[1], 128, 10,
                     nnx.Rngs(params=args.seed, dropout=args.seed + 1))
  optimizer = nnx.Optimizer(
      model, jadam.adamw(schedule, weight_decay=args.weight_decay,
                         mask=decay_mask), wrt=nnx.Param)

  rng = np.random.default_rng(args.seed)
  history = {"loss": [], "test_accuracy": []}
  for epoch in range(1, args.epochs + 1):
    order = rng.permutation(len(x_train))
    model.train()
    losses = []
    for i in tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{args.epochs}",
                  leave=False, unit="batch"):
      batch = order[i * args.batch_size:(i + 1) * args.batch_size]
      losses.append(float(train_step(model, optimizer, x_train[batch],
                                     y_train[batch])))
    model.eval()
    history["loss"].append(float(np.mean(losses)))
    history["test_accuracy"].append(float(accuracy(model, x_test, y_test)))
    print(f"Epoch {epoch}, Loss: {history['loss'][-1]:.4f}, "
          f"test accuracy: {100 * history['test_accuracy'][-1]:.2f}%", flush=True)
  return history


if __name__ == "__main__":
  main()

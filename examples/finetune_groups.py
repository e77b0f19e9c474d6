"""Fine-tuning with parameter groups: frozen backbone, no decay, a slow layer.

A Flax NNX classifier is first trained on scikit-learn's digits 0–4. It is
then fine-tuned on digits 5–9 with a fresh head and one optimizer holding
three groups:

    jadam.adamw(schedule, weight_decay=1e-2, groups=[
        jadam.Group("backbone", match=r"backbone/.*", frozen=True),
        jadam.Group("no_decay", match=r".*/(bias|scale)", weight_decay=0.0),
        jadam.Group("adapter", match=r"adapter/kernel", lr_scale=0.1),
    ])

Half way through, the adapter's learning-rate scale is raised with
``jadam.set_group_hyperparams``; the jitted step is not compiled again (the
script counts XLA's compilations). The backbone ends exactly where pre-training left
it, and holds no optimizer moments.

Run: python examples/finetune_groups.py   (how long: docs/durations.md)
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
from flax_nnx import load_digits_split

GROUPS = [
    jadam.Group("backbone", match=r"backbone/.*", frozen=True),
    jadam.Group("no_decay", match=r".*/(bias|scale)", weight_decay=0.0),
    jadam.Group("adapter", match=r"adapter/kernel", lr_scale=0.1),
]


class Classifier(nnx.Module):
  """backbone (Linear → LayerNorm → ReLU) → adapter (Linear) → head."""

  def __init__(self, rngs: nnx.Rngs):
    self.backbone = nnx.Linear(64, 128, rngs=rngs)
    self.norm = nnx.LayerNorm(128, rngs=rngs)
    self.adapter = nnx.Linear(128, 64, rngs=rngs)
    self.head = nnx.Linear(64, 5, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.norm(self.backbone(x)))
    return self.head(nnx.relu(self.adapter(h)))


# XLA compilations in this process, counted around the training steps.
COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **kwargs: COMPILES.append(event)
    if "backend_compile" in event else None)


@nnx.jit
def train_step(model, optimizer, x, y):
  loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(
      m(x), y).mean()
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def accuracy(model, x, y):
  return jnp.mean(jnp.argmax(model(x), -1) == y)


def epochs(model, optimizer, x, y, n_epochs, batch_size, rng, desc,
           on_epoch=None):
  """Train for ``n_epochs`` with a progress bar: the mean loss per epoch,
  and how many times XLA compiled during the training steps."""
  steps = len(x) // batch_size
  losses, compiles = [], 0
  for epoch in range(n_epochs):
    if on_epoch is not None:
      on_epoch(epoch)
    order = rng.permutation(len(x))
    batch_losses = []
    for i in tqdm(range(steps), desc=f"{desc} {epoch + 1}/{n_epochs}",
                  leave=False, unit="batch"):
      batch = order[i * batch_size:(i + 1) * batch_size]
      before = len(COMPILES)
      batch_losses.append(float(train_step(model, optimizer, x[batch],
                                           y[batch])))
      compiles += len(COMPILES) - before
    losses.append(float(np.mean(batch_losses)))
  return losses, compiles


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--pretrain-epochs", type=int, default=4)
  parser.add_argument("--finetune-epochs", type=int, default=6)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--learning-rate", type=float, default=3e-3)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  print(f"JAX {jax.__version__} on {jax.default_backend()}", flush=True)
  x_train, y_train, x_test, y_test = load_digits_split(args.seed)
  first, second = y_train < 5, y_train >= 5
  rng = np.random.default_rng(args.seed)
  model = Classifier(nnx.Rngs(args.seed))

  # Stage 1: train everything on digits 0-4.
  pretrain = nnx.Optimizer(model, jadam.adamw(args.learning_rate,
                                              weight_decay=1e-2),
                           wrt=nnx.Param)
  epochs(model, pretrain, x_train[first], y_train[first],
         args.pretrain_epochs, args.batch_size, rng, "pre-train")
  pretrained = float(accuracy(model, x_test[y_test < 5], y_test[y_test < 5]))
  print(f"pre-trained on 0-4: test accuracy {100 * pretrained:.2f}%")

  # Stage 2: a fresh head for digits 5-9; backbone frozen, adapter slow.
  model.head = nnx.Linear(64, 5, rngs=nnx.Rngs(args.seed + 1))
  backbone = np.asarray(model.backbone.kernel[...])
  steps = args.finetune_epochs * (int(second.sum()) // args.batch_size)
  schedule = optax.cosine_decay_schedule(args.learning_rate, steps)
  optimizer = nnx.Optimizer(
      model, jadam.adamw(schedule, weight_decay=1e-2, groups=GROUPS),
      wrt=nnx.Param)

  def raise_adapter_rate(epoch):
    if epoch == args.finetune_epochs // 2:
      optimizer.opt_state = jadam.set_group_hyperparams(
          optimizer.opt_state, adapter={"lr_scale": 0.5})
      print(f"epoch {epoch + 1}: adapter lr_scale 0.1 -> 0.5")

  losses, compiles = epochs(model, optimizer, x_train[second],
                            y_train[second] - 5, args.finetune_epochs,
                            args.batch_size, rng, "fine-tune",
                            raise_adapter_rate)
  tuned = float(accuracy(model, x_test[y_test >= 5], y_test[y_test >= 5] - 5))
  moved = float(np.max(np.abs(np.asarray(model.backbone.kernel[...])
                              - backbone)))
  print(f"fine-tuned on 5-9: loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
        f"test accuracy {100 * tuned:.2f}%")
  print(f"XLA compiled {compiles} time(s) during fine-tuning; backbone moved by "
        f"{moved}")
  print(jadam.describe(optimizer.opt_state, GROUPS))
  return {"pretrained_accuracy": pretrained, "accuracy": tuned,
          "losses": losses, "compiles": compiles, "backbone_moved": moved}


if __name__ == "__main__":
  main()

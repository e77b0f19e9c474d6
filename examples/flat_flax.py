"""The flat fast path with Flax NNX and Linen, checked against the tree path.

One model, trained twice with ``jadam.adamw`` (weight decay on kernels
only): once on the ordinary parameter tree, once on a :class:`jadam.FlatView`
(one buffer per dtype and decay group). The two runs print the same losses and
end on the same parameters, to float32 rounding; the flat step is faster when
the model has many leaves.

Run: python examples/flat_flax.py [--steps 100] [--width 32] [--depth 48]
(``--help`` lists the options; how long: docs/durations.md)
"""

from __future__ import annotations

import argparse
import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jadam

# The defaults of both main() and the command line, so the two stay alike.
STEPS, WIDTH, DEPTH = 100, 32, 48


def decay_mask(params):
  """True for kernels; biases and LayerNorm parameters are not decayed."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(getattr(k, "key", None) == "kernel" for k in path),
      params)


class Mlp(nnx.Module):
  """A deep narrow MLP: many small leaves, where the fast path pays off."""

  def __init__(self, width: int, depth: int, rngs: nnx.Rngs):
    self.layers = nnx.List([nnx.Linear(width, width, rngs=rngs)
                            for _ in range(depth)])
    self.norms = nnx.List([nnx.LayerNorm(width, rngs=rngs)
                           for _ in range(depth)])

  def __call__(self, x):
    for layer, norm in zip(self.layers, self.norms):
      x = x + jnp.tanh(layer(norm(x)))
    return x


def data(width: int, seed: int = 0):
  kx, kw = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(kx, (256, width))
  return x, jnp.sin(x @ jax.random.normal(kw, (width, width)) / width**0.5)


def nnx_flat(steps: int, width: int, depth: int):
  """The NNX recipe: split once, train the flat buffers, merge at the end."""
  model = Mlp(width, depth, nnx.Rngs(0))
  x, y = data(width)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  view = jadam.FlatView(params, groups=decay_mask)
  opt = jadam.adamw(1e-3, weight_decay=1e-2, mask=view.mask(decay_mask))
  flat = view.ravel(params)
  state = opt.init(flat)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(flat, state, x, y):
    def loss_fn(flat):
      model = nnx.merge(graphdef, view.unravel(flat), rest, copy=True)
      return jnp.mean((model(x) - y) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(flat)   # grads are flat too
    updates, state = opt.update(grads, state, flat)
    return optax.apply_updates(flat, updates), state, loss

  flat, losses, seconds = _loop(train_step, flat, state, x, y, steps)
  nnx.update(model, view.unravel(flat))   # the trained model, as a tree again
  print(f"{view}: {seconds * 1e3:.2f} ms/step")
  return model, losses


def nnx_tree(steps: int, width: int, depth: int):
  """The same training on the parameter tree (the reference)."""
  model = Mlp(width, depth, nnx.Rngs(0))
  x, y = data(width)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt = jadam.adamw(1e-3, weight_decay=1e-2, mask=decay_mask)
  state = opt.init(params)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, state, x, y):
    def loss_fn(params):
      return jnp.mean((nnx.merge(graphdef, params, rest)(x) - y) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  params, losses, seconds = _loop(train_step, params, state, x, y, steps)
  nnx.update(model, params)
  print(f"tree of {len(jax.tree.leaves(params))} leaves: "
        f"{seconds * 1e3:.2f} ms/step")
  return model, losses


def linen_flat(steps: int, width: int):
  """The Linen recipe: the view wraps the ``params`` collection."""
  model = nn.Sequential([nn.Dense(width), nn.LayerNorm(), nn.tanh,
                         nn.Dense(width)])
  x, y = data(width)
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  view = jadam.FlatView(params, groups=decay_mask)
  opt = jadam.adamw(1e-3, weight_decay=1e-2, mask=view.mask(decay_mask))
  flat = view.ravel(params)
  state = opt.init(flat)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(flat, state, x, y):
    loss_fn = lambda flat: jnp.mean(
        (model.apply({"params": view.unravel(flat)}, x) - y) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(flat)
    updates, state = opt.update(grads, state, flat)
    return optax.apply_updates(flat, updates), state, loss

  _, losses, _ = _loop(train_step, flat, state, x, y, steps)
  return losses[-1]


def _loop(train_step, params, state, x, y, steps):
  """Run ``steps`` steps; returns (final params, losses, seconds per step)."""
  params, state, loss = train_step(params, state, x, y)   # compile
  losses = [float(loss)]
  start = time.perf_counter()
  for _ in range(steps - 1):
    params, state, loss = train_step(params, state, x, y)
    losses.append(float(loss))
  seconds = (time.perf_counter() - start) / max(steps - 1, 1)
  return params, losses, seconds


def parse_args(argv=None) -> argparse.Namespace:
  """The command line: ``--steps``, ``--width`` and ``--depth`` of :func:`main`."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=STEPS,
                      help="training steps of each run (default: %(default)s)")
  parser.add_argument("--width", type=int, default=WIDTH,
                      help="units per layer (default: %(default)s)")
  parser.add_argument("--depth", type=int, default=DEPTH,
                      help="residual blocks of the NNX model "
                      "(default: %(default)s)")
  return parser.parse_args(argv)


def main(steps: int = STEPS, width: int = WIDTH, depth: int = DEPTH):
  """Train flat and tree; returns (flat losses, tree losses, relative
  parameter difference, final Linen loss)."""
  flat_model, flat_losses = nnx_flat(steps, width, depth)
  tree_model, tree_losses = nnx_tree(steps, width, depth)
  print(f"NNX loss: {flat_losses[0]:.4f} -> {flat_losses[-1]:.6f} (flat), "
        f"{tree_losses[-1]:.6f} (tree)")
  a = np.concatenate([np.ravel(p) for p in jax.tree.leaves(
      nnx.state(flat_model, nnx.Param))])
  b = np.concatenate([np.ravel(p) for p in jax.tree.leaves(
      nnx.state(tree_model, nnx.Param))])
  difference = float(np.linalg.norm(a - b) / np.linalg.norm(b))
  print(f"flat vs tree parameters: relative difference {difference:.1e}")
  linen_loss = linen_flat(steps, width)
  print(f"Linen flat loss after {steps} steps: {linen_loss:.6f}")
  return flat_losses, tree_losses, difference, linen_loss


if __name__ == "__main__":
  # Parsing computes nothing, so --help exits here without touching JAX.
  args = parse_args()
  # One pass over memory per optimizer step on CPU (see docs/performance.md);
  # it must come before JAX computes anything, so not inside main(), which
  # the tests call in a process that is already running.
  jadam.enable_cpu_fusion()
  main(args.steps, args.width, args.depth)

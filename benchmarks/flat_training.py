"""A full training step of a Flax NNX VAE on the tree path and on FlatView.

The model draws randomness (the reparameterisation sample), so the flat path
follows the docs' NNX recipe: ``nnx.merge(..., copy=True)`` inside the loss
and the RNG counters carried out of it. Both paths take jadam.adam on the
same batches; prints one JSON line per path (median step time over
``--repeats`` groups of ``--steps`` steps, and the first call's compile and
run time) and the ratio flat/tree:

    python benchmarks/flat_training.py
"""

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jadam


class VAE(nnx.Module):
  """784 -> 512 -> 2 x latent -> 512 -> 784, as Flax's NNX VAE example."""

  def __init__(self, latent: int, rngs: nnx.Rngs):
    self.enc = nnx.Linear(784, 512, rngs=rngs)
    self.mean = nnx.Linear(512, latent, rngs=rngs)
    self.logvar = nnx.Linear(512, latent, rngs=rngs)
    self.dec1 = nnx.Linear(latent, 512, rngs=rngs)
    self.dec2 = nnx.Linear(512, 784, rngs=rngs)
    self.rngs = rngs

  def __call__(self, x):
    h = nnx.relu(self.enc(x))
    mean, logvar = self.mean(h), self.logvar(h)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(
        self.rngs.noise(), mean.shape)
    logits = self.dec2(nnx.relu(self.dec1(z)))
    kl = 0.5 * jnp.mean(jnp.exp(logvar) - 1.0 - logvar + mean**2)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, x)) + kl


def make_step(graphdef, tx, to_params=lambda params: params):
  """The jitted training step; ``to_params`` turns what is trained into the
  model's parameters (``view.unravel`` on the flat path)."""
  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def step(trained, rest, state, x):
    def loss_fn(trained):
      model = nnx.merge(graphdef, to_params(trained), rest, copy=True)
      return model(x), nnx.state(model, nnx.Not(nnx.Param))
    (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained)
    updates, state = tx.update(grads, state, trained)
    return optax.apply_updates(trained, updates), rest, state, loss
  return step


def run(path: str, batch: int, steps: int, repeats: int) -> dict:
  model = VAE(20, nnx.Rngs(0, noise=1))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = jadam.adam(1e-3)
  if path == "flat":
    view = jadam.FlatView(params)
    params = view.ravel(params)
    step = make_step(graphdef, tx, view.unravel)
  else:
    step = make_step(graphdef, tx)
  state = tx.init(params)
  x = jax.random.uniform(jax.random.key(2), (batch, 784))
  start = time.perf_counter()
  params, rest, state, loss = step(params, rest, state, x)
  loss.block_until_ready()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      params, rest, state, loss = step(params, rest, state, x)
    loss.block_until_ready()
    times.append((time.perf_counter() - start) / steps)
  return {"path": path, "leaves": len(jax.tree.leaves(nnx.state(model,
                                                                nnx.Param))),
          "step_ms": 1e3 * statistics.median(times),
          "first_call_s": first, "loss": float(loss),
          "jax": jax.__version__, "backend": jax.default_backend()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  rows = {}
  for path in ("tree", "flat", "tree", "flat"):
    row = run(path, args.batch, args.steps, args.repeats)
    print(json.dumps(row))
    rows.setdefault(path, []).append(row["step_ms"])
  print(json.dumps({"flat_over_tree": statistics.median(rows["flat"])
                    / statistics.median(rows["tree"])}))


if __name__ == "__main__":
  main()

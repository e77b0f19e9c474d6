"""The numerics doctor on two planted faults, and their fixes, as heat maps.

The MLP of examples/telemetry.py (64 -> 64 -> 10, tanh) learns the 8x8
digits four times, each optimizer wrapped in ``jadam.doctor(..., every=10)``:

* ``bfloat16``: parameters in bfloat16 at a small learning rate (3e-5):
  the kernels' updates are below half their spacing and are rounded away;
* ``bfloat16 + stochastic rounding``: the fix the doctor names;
* ``eps=1e-2``: ε far above the gradients' scale, so ε sets the step;
* ``eps=1e-8``: the fix.

Each run prints ``jadam.diagnose(state)``; ``jadam.doctor_log(state)`` is
read at every measuring step into one row of a per-tensor heat map.

Run: python examples/doctor_heatmap.py [--plot [PATH]]
(how long: docs/durations.md)
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import jadam
from telemetry import cross_entropy  # the same MLP
from telemetry import init_mlp

RUNS = {
    "bfloat16": dict(dtype=jnp.bfloat16, lr=3e-5, eps=1e-8, rounding=False,
                     show="rounded_away"),
    "bfloat16 + stochastic rounding": dict(
        dtype=jnp.bfloat16, lr=3e-5, eps=1e-8, rounding=True,
        show="rounded_away"),
    "eps=1e-2": dict(dtype=jnp.float32, lr=1e-3, eps=1e-2, rounding=False,
                     show="eps_dominated"),
    "eps=1e-8": dict(dtype=jnp.float32, lr=1e-3, eps=1e-8, rounding=False,
                     show="eps_dominated"),
}


def run(name: str, steps: int, seed: int = 0) -> dict:
  """One run: its losses, findings and heat map (tensors x measurements)."""
  config = RUNS[name]
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  inner = jadam.adam(config["lr"], eps=config["eps"])
  if config["rounding"]:
    inner = optax.chain(inner, jadam.stochastic_rounding(seed))
  opt = jadam.doctor(inner, every=10)
  params = jax.tree.map(lambda p: p.astype(config["dtype"]),
                        init_mlp(jax.random.PRNGKey(seed)))
  state = opt.init(params)

  @jax.jit
  def step(params, state, xb, yb):
    loss, grads = jax.value_and_grad(
        lambda p: cross_entropy(jax.tree.map(
            lambda a: a.astype(jnp.float32), p), xb, yb))(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  rng = np.random.default_rng(seed)
  losses, rows, paths = [], [], None
  for t in range(1, steps + 1):
    batch = rng.integers(0, len(x), 128)
    params, state, loss = step(params, state, x[batch], y[batch])
    losses.append(float(loss))
    if t % 10 == 0:
      log = jadam.doctor_log(state)
      paths = [k[len("doctor/"):-len(config["show"]) - 1] for k in log
               if k.endswith("/" + config["show"])]
      rows.append([log[f"doctor/{p}/{config['show']}"] for p in paths])
  findings = jadam.diagnose(state)
  print(f"== {name}: loss {np.mean(losses[:10]):.3f} -> "
        f"{np.mean(losses[-10:]):.3f}")
  print(findings)
  return dict(losses=losses, findings=findings, paths=paths,
              heat=np.array(rows).T, show=config["show"])


def plot(results: dict, path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(2, 2, figsize=(10, 5), sharex=True, sharey=True,
                           layout="constrained")
  for ax, (name, r) in zip(axes.T.reshape(-1), results.items()):
    heat = np.nan_to_num(r["heat"], nan=0.0)
    image = ax.imshow(heat, aspect="auto", vmin=0, vmax=1, cmap="magma",
                      extent=(5, 10 * heat.shape[1] + 5, len(r["paths"]), 0))
    ax.set_yticks(np.arange(len(r["paths"])) + 0.5, r["paths"], fontsize=7)
    found = len(r["findings"])
    ax.set_title(f"{name}: {r['show']} ({found} finding"
                 f"{'' if found == 1 else 's'})", fontsize=9)
  for ax in axes[-1]:
    ax.set_xlabel("step")
  fig.colorbar(image, ax=axes, shrink=0.8, label="share of the tensor")
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  print(f"wrote {path}")


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--plot", type=pathlib.Path, nargs="?", default=None,
                      const=pathlib.Path("jadam-output/doctor_heatmap.png"),
                      help="write the heat maps to this PNG")
  return parser.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  print(f"JAX {jax.__version__} on {jax.devices()[0].platform}")
  results = {name: run(name, args.steps) for name in RUNS}
  if args.plot is not None:
    plot(results, args.plot)
  return results


if __name__ == "__main__":
  main()

"""Train a model whose float32 Adam state does not fit a device-memory budget.

A tanh MLP regression (``--width`` wide, ``--depth`` hidden layers) is trained
with ``jadam.sharding.offload(jadam.adam(lr, mu_dtype="int8", nu_dtype="int8"))``: the
int8 moments live in host memory (``pinned_host``) between steps and are moved
to the device and back inside the compiled step. The script prints what each
choice needs on the device between steps,

    parameters + float32 Adam state          (plain optax.adam / jadam.adam)
    parameters + int8 state                  (jadam int8 moments, on device)
    parameters only                          (int8 moments, offloaded)

against ``--budget-mib`` (by default only the offloaded setting fits), checks
that what stays on the device fits, and trains with offload. On a GPU, start it with
``XLA_PYTHON_CLIENT_MEM_FRACTION`` set so that JAX's pool is the budget, and it
also prints the device's measured peak (``memory_stats``); on CPU, device and
host memory are the same RAM, so only the arithmetic is shown.

Run: python examples/offload.py   (how long: docs/durations.md)
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jadam


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--width", type=int, default=512)
  parser.add_argument("--depth", type=int, default=4)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--budget-mib", type=float, default=4.0,
                      help="device memory allowed for parameters and "
                      "optimizer state between steps (default 4 MiB)")
  return parser.parse_args(argv)


def init_mlp(key, width, depth, n_in=16):
  sizes = [n_in] + [width] * depth + [1]
  params = {}
  for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
    key, sub = jax.random.split(key)
    params[f"layer{i}"] = {
        "w": jax.random.normal(sub, (fan_in, fan_out)) / np.sqrt(fan_in),
        "b": jnp.zeros((fan_out,))}
  return params


def forward(params, x):
  *hidden, last = params.values()
  for layer in hidden:
    x = jnp.tanh(x @ layer["w"] + layer["b"])
  return (x @ last["w"] + last["b"])[:, 0]


def device_bytes(tree):
  """Bytes of ``tree`` that sit in device memory."""
  return sum(x.nbytes for x in jax.tree.leaves(tree)
             if x.sharding.memory_kind in (None, "device"))


def main(argv=None):
  args = parse_args(argv)
  budget = args.budget_mib * 2**20
  params = init_mlp(jax.random.PRNGKey(0), args.width, args.depth)
  n = sum(x.size for x in jax.tree.leaves(params))
  param_bytes = device_bytes(params)
  plain = jadam.sharding.abstract_state(jadam.adam(args.lr), params)
  int8 = jadam.adam(args.lr, mu_dtype="int8", nu_dtype="int8")
  int8_state = jadam.sharding.abstract_state(int8, params)
  state_bytes = lambda s: sum(x.size * x.dtype.itemsize
                              for x in jax.tree.leaves(s))
  print(f"{n:,} parameters, budget {args.budget_mib:.1f} MiB")
  rows = [("parameters + float32 Adam state", param_bytes + state_bytes(plain)),
          ("parameters + int8 state on device",
           param_bytes + state_bytes(int8_state)),
          ("parameters only (int8 state offloaded)", param_bytes)]
  for name, size in rows:
    verdict = "fits" if size <= budget else "does NOT fit"
    print(f"  {name:42s} {size / 2**20:7.2f} MiB  {verdict}")

  opt = jadam.sharding.offload(int8)
  key = jax.random.PRNGKey(1)
  teacher = init_mlp(jax.random.PRNGKey(2), 32, 2)

  @jax.jit
  def step(params, state, x):
    y = forward(teacher, x)
    loss, grads = jax.value_and_grad(
        lambda p: jnp.mean((forward(p, x) - y) ** 2))(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  state = opt.init(params)
  kinds = {x.sharding.memory_kind for x in jax.tree.leaves(state)}
  print(f"optimizer state memory kinds: {sorted(kinds)}; "
        f"device bytes between steps: {device_bytes((params, state)):,}")
  assert device_bytes((params, state)) <= budget
  losses = []
  for t in range(args.steps):
    key, sub = jax.random.split(key)
    x = jax.random.normal(sub, (64, 16))
    params, state, loss = step(params, state, x)
    losses.append(float(loss))
    if t % 100 == 0 or t == args.steps - 1:
      print(f"step {t:4d}  loss {losses[-1]:.5f}")
  stats = jax.devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    print(f"device peak bytes in use: {stats['peak_bytes_in_use']:,}")
  else:
    print("this backend reports no device memory statistics (CPU: device "
          "and host memory are the same RAM)")
  return losses


if __name__ == "__main__":
  main()

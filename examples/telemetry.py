"""Gradient-health telemetry while training a small classifier.

An MLP (64 -> 64 -> 10, tanh) learns scikit-learn's bundled 8x8 digits with

    jadam.with_telemetry(jadam.skip_nonfinite(jadam.adam(lr)))

and logs ``jadam.stats(state)`` every ``--log-every`` steps: gradient norm,
largest |g|, update-to-parameter ratio, smallest and largest second moment,
and the number of skipped steps. ``--nan-at STEP`` poisons the gradients of
one step with a NaN to show what a bad step looks like in the log (the step
is skipped, the parameters and moments keep their values).

Run: python examples/telemetry.py   (how long: docs/durations.md)

``--overhead`` instead times the wrappers side by side (see
docs/reliability.md for the numbers measured on this project's machine).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import jadam

COLUMNS = ("step", "loss", "grad_norm", "grad_max_abs", "update_ratio",
           "nu_min", "nu_max", "skipped_steps")


def init_mlp(key, sizes=(64, 64, 10)):
  """Glorot-scaled weights and zero biases for a tanh MLP."""
  params = {}
  for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
    key, sub = jax.random.split(key)
    params[f"dense{i}"] = {
        "kernel": jax.random.normal(sub, (fan_in, fan_out)) / np.sqrt(fan_in),
        "bias": jnp.zeros(fan_out)}
  return params


def forward(params, x):
  layers = [params[k] for k in sorted(params)]
  for layer in layers[:-1]:
    x = jnp.tanh(x @ layer["kernel"] + layer["bias"])
  return x @ layers[-1]["kernel"] + layers[-1]["bias"]


def cross_entropy(params, x, y):
  logits = forward(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_step(opt):
  @jax.jit
  def step(params, state, x, y, poison):
    loss, grads = jax.value_and_grad(cross_entropy)(params, x, y)
    # poison is 0 or NaN: a stand-in for a real blow-up (a bad batch, an
    # overflow in mixed precision) on exactly one chosen step.
    grads = jax.tree.map(lambda g: g + poison, grads)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss
  return step


def train(args) -> list[dict[str, float]]:
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  opt = jadam.with_telemetry(jadam.skip_nonfinite(jadam.adam(args.learning_rate)))
  params = init_mlp(jax.random.PRNGKey(args.seed))
  state = opt.init(params)
  step = make_step(opt)
  rng = np.random.default_rng(args.seed)
  log = []
  print(" ".join(f"{c:>13s}" for c in COLUMNS), flush=True)
  for t in range(1, args.steps + 1):
    batch = rng.integers(0, len(x), args.batch_size)
    poison = np.float32(np.nan if t == args.nan_at else 0.0)
    params, state, loss = step(params, state, x[batch], y[batch], poison)
    if t % args.log_every == 0 or t == args.nan_at or t == args.steps:
      record = {k: float(v) for k, v in jadam.stats(state).items()}
      record["loss"] = float(loss)
      log.append(record)
      print(" ".join(f"{record[c]:13.4g}" for c in COLUMNS), flush=True)
  accuracy = float(jnp.mean(jnp.argmax(forward(params, x), -1) == y))
  print(f"training accuracy after {args.steps} steps: {accuracy:.3f}")
  return log


# ---------------------------------------------------------------------------
# Side-by-side timing of the wrappers (--overhead).


def _time_steps(step, carry, data, rounds):
  """Seconds of ``rounds`` calls ``carry = step(*carry, *data)``."""
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    carry = step(*carry, *data)
    jax.block_until_ready(carry)
    times.append(time.perf_counter() - start)
  return carry, times


def overhead(args) -> dict[str, dict[str, float]]:
  """Time plain Adam against the health wrappers, interleaved, and print it.

  Two workloads: the optimizer step alone (update + apply_updates, donated)
  on a 4M-parameter tree of 16 leaves, and a full training step (forward,
  backward, update) of a 784-1024-1024-10 MLP at batch 256.
  """
  lr = 1e-3
  configs = {
      "adam": lambda: jadam.adam(lr),
      "skip_nonfinite(adam)": lambda: jadam.skip_nonfinite(jadam.adam(lr)),
      "optax.apply_if_finite(adam)":
          lambda: optax.apply_if_finite(jadam.adam(lr), 10),
      "with_telemetry(adam)": lambda: jadam.with_telemetry(jadam.adam(lr)),
      "with_telemetry(adam, every=10)":
          lambda: jadam.with_telemetry(jadam.adam(lr), every=10),
      "with_telemetry(skip_nonfinite(adam))":
          lambda: jadam.with_telemetry(jadam.skip_nonfinite(jadam.adam(lr))),
  }
  key = jax.random.PRNGKey(0)
  tree = {f"w{i}": 0.1 * jax.random.normal(jax.random.fold_in(key, i),
                                           (250_000,)) for i in range(16)}
  grads = jax.tree.map(lambda p: 1e-3 * jnp.cos(p), tree)
  mlp = init_mlp(key, (784, 1024, 1024, 10))
  xb = jax.random.normal(key, (256, 784))
  yb = jax.random.randint(key, (256,), 0, 10)

  # Data are arguments, not closed-over constants, so that XLA cannot fold
  # the finiteness check or the norms away at compile time.
  def optimizer_only(opt):
    def step(p, s, g):
      updates, s = opt.update(g, s, p)
      return optax.apply_updates(p, updates), s
    fn = jax.jit(step, donate_argnums=(0, 1))
    return fn, (jax.tree.map(jnp.copy, tree), opt.init(tree)), (grads,)

  def full_step(opt):
    def step(p, s, x, y):
      grads = jax.grad(cross_entropy)(p, x, y)
      updates, s = opt.update(grads, s, p)
      return optax.apply_updates(p, updates), s
    fn = jax.jit(step, donate_argnums=(0, 1))
    return fn, (jax.tree.map(jnp.copy, mlp), opt.init(mlp)), (xb, yb)

  results = {}
  for workload, build in (("optimizer step, 4M params", optimizer_only),
                          ("train step, MLP 1.9M params", full_step)):
    runs = {}
    for name, make in configs.items():
      fn, carry, data = build(make())
      carry, _ = _time_steps(fn, carry, data, 3)  # compile and warm up
      runs[name] = [fn, carry, data, []]
    # Interleave the configurations so that load from other processes on the
    # machine hits them all alike.
    for _ in range(args.rounds):
      for run in runs.values():
        run[1], times = _time_steps(run[0], run[1], run[2], 5)
        run[3].extend(times)
    base = np.median(runs["adam"][3])
    print(f"\n{workload}: median (min) ms over {5 * args.rounds} steps each")
    results[workload] = {}
    for name, (_, _, _, times) in runs.items():
      med = float(np.median(times))
      results[workload][name] = med
      print(f"  {name:40s} {1e3 * med:8.3f} ({1e3 * min(times):7.3f})"
            f"  {100 * (med / base - 1):+6.1f}%", flush=True)
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--learning-rate", type=float, default=3e-3)
  parser.add_argument("--log-every", type=int, default=50)
  parser.add_argument("--nan-at", type=int, default=150,
                      help="poison the gradients of this step (0: never)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--overhead", action="store_true",
                      help="time the wrappers instead of training")
  parser.add_argument("--rounds", type=int, default=20,
                      help="interleaved timing rounds for --overhead")
  args = parser.parse_args(argv)
  if args.overhead:
    return overhead(args)
  return train(args)


if __name__ == "__main__":
  main()

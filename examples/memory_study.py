"""Lean optimizer state, measured: bf16 / int8 moments and bf16 parameters.

Three experiments (how long they take: docs/durations.md):

1. The quickstart regression (``examples/quickstart.py``: ``Regressor``,
   ``make_regression``, same schedule and clipping) with the moments stored in
   float32, bfloat16, float16 and block-wise int8.
2. An MLP classifier (64 → 256 → 10, ReLU) on scikit-learn's bundled digits
   data set (1797 8×8 images, 80/20 split), the same storage formats.
3. bfloat16 *parameters* on the regression data: round-to-nearest parameter
   updates against ``jadam.stochastic_rounding`` against float32 parameters.

Run:  python examples/memory_study.py [--quick] [--plot [DIR]]
      prints a Markdown table per experiment and, with --plot, writes
      memory_storage.png and memory_bf16_params.png into DIR (by default
      ./jadam-output/, made in the current directory if needed); the
      figures of docs/memory.md are committed, so refresh them explicitly
      with  python examples/memory_study.py --plot docs/img
      python examples/memory_study.py --speed 4194304 16777216
      times float32, bfloat16 and int8 moment steps side by side;
      python examples/memory_study.py --parts 4194304
      times the pieces of an int8 step (decode, encode, block maxima, random
      bits) each on its own, to show where the int8 step's time goes.
      Both timing modes turn on XLA:CPU multi-output fusion first
      (``jadam.enable_cpu_fusion()``), as ``python -m benchmarks.bench`` does;
      add --default-xla-flags to time with XLA's defaults.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jadam

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import quickstart  # noqa: E402  (the regression model and data)

# Where --plot without a folder writes: a folder of the current directory,
# so that a run never overwrites the figures committed in docs/img.
DEFAULT_OUT = pathlib.Path("jadam-output")

# Storage settings compared. The quickstart model's largest leaf has 256
# elements, below int8's default min_size of 4096 (which would leave it all
# float32), so the regression also runs int8 with min_size=0 to quantize
# every leaf; the digits MLP's 64×256 kernel is quantized by the default.
STORAGES = {
    "float32": dict(mu_dtype=jnp.float32, nu_dtype=jnp.float32),
    "bfloat16": dict(mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
    "float16": dict(mu_dtype=jnp.float16, nu_dtype=jnp.float16),
    "int8": dict(mu_dtype="int8", nu_dtype="int8"),
    "int8 (min_size=0)": dict(mu_dtype=jadam.BlockwiseInt8(min_size=0),
                              nu_dtype=jadam.BlockwiseInt8(min_size=0)),
}


def state_bytes(state) -> int:
  """Bytes of every array in an optimizer state."""
  return sum(leaf.nbytes for leaf in jax.tree.leaves(state))


# --------------------------------------------------------------------------
# 1. The quickstart regression.


def train_regression(storage: dict, epochs: int = 10, seed: int = 0,
                     learning_rate: float = 3e-3, batch_size: int = 32):
  """Train ``quickstart.Regressor`` as the quickstart does, moments stored as
  ``storage``; returns (per-epoch mean training loss, full-data MSE with
  dropout off)."""
  from flax import nnx
  x, y = quickstart.make_regression(seed=seed)
  steps_per_epoch = len(x) // batch_size
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=learning_rate,
      warmup_steps=steps_per_epoch // 2,
      decay_steps=epochs * steps_per_epoch, end_value=learning_rate / 20)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   jadam.scale_by_adam(**storage),
                   optax.scale_by_learning_rate(schedule))
  model = quickstart.Regressor(x.shape[1],
                               nnx.Rngs(params=seed, dropout=seed + 1))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  rng = np.random.default_rng(seed)
  losses = []
  for _ in range(epochs):
    order = rng.permutation(len(x))
    model.train()
    epoch = [quickstart.train_step(
        model, optimizer, x[order[i * batch_size:(i + 1) * batch_size]],
        y[order[i * batch_size:(i + 1) * batch_size]])
             for i in range(steps_per_epoch)]
    losses.append(float(np.mean(jax.device_get(epoch))))
  model.eval()
  return losses, float(quickstart.mse(model, x, y))


# --------------------------------------------------------------------------
# 2. An MLP on the digits data set.


def digits_data(seed: int = 0):
  """Standardised digits features and labels, 80/20 train/test split."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split
  data = load_digits()
  x = (data.data / 16.0).astype(np.float32)
  x_train, x_test, y_train, y_test = train_test_split(
      x, data.target, test_size=0.2, random_state=seed, stratify=data.target)
  mean, std = x_train.mean(0), x_train.std(0) + 1e-3
  return ((x_train - mean) / std, y_train.astype(np.int32),
          (x_test - mean) / std, y_test.astype(np.int32))


def mlp_init(key, sizes=(64, 256, 10), dtype=jnp.float32):
  params = {}
  for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
    key, sub = jax.random.split(key)
    params[f"dense{i}"] = {
        "kernel": (jax.random.normal(sub, (n_in, n_out)) *
                   np.sqrt(2.0 / n_in)).astype(dtype),
        "bias": jnp.zeros(n_out, dtype)}
  return params


def mlp_apply(params, x):
  n = len(params)
  for i in range(n):
    layer = params[f"dense{i}"]
    x = x @ layer["kernel"].astype(jnp.float32) + layer["bias"].astype(
        jnp.float32)
    if i < n - 1:
      x = jax.nn.relu(x)
  return x


def cross_entropy(params, x, y):
  logits = mlp_apply(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _fit(params, tx, loss_fn, x, y, epochs, batch_size, seed):
  """Mini-batch training, one jitted scan per epoch; returns params, state,
  the full-training-set loss after each epoch."""
  state = tx.init(params)
  n_batches = len(x) // batch_size

  @jax.jit
  def epoch(params, state, order):
    def step(carry, idx):
      params, state = carry
      grads = jax.grad(loss_fn)(params, x[idx], y[idx])
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None
    batches = order[:n_batches * batch_size].reshape(n_batches, batch_size)
    (params, state), _ = jax.lax.scan(step, (params, state), batches)
    return params, state, loss_fn(params, x, y)

  rng = np.random.default_rng(seed)
  losses = []
  for _ in range(epochs):
    params, state, loss = epoch(params, state,
                                jnp.asarray(rng.permutation(len(x))))
    losses.append(float(loss))
  return params, state, losses


def train_digits(storage: dict, epochs: int = 30, seed: int = 0,
                 learning_rate: float = 1e-3, batch_size: int = 32):
  """Train the digits MLP with Adam, moments stored as ``storage``; returns
  (per-epoch training loss, test accuracy in %, optimizer state bytes)."""
  x_train, y_train, x_test, y_test = digits_data(seed)
  params = mlp_init(jax.random.PRNGKey(seed))
  tx = jadam.adam(learning_rate, **storage)
  params, state, losses = _fit(params, tx, cross_entropy,
                               jnp.asarray(x_train), jnp.asarray(y_train),
                               epochs, batch_size, seed)
  accuracy = 100.0 * float(np.mean(
      np.argmax(mlp_apply(params, jnp.asarray(x_test)), -1) == y_test))
  return losses, accuracy, state_bytes(state)


# --------------------------------------------------------------------------
# 3. bfloat16 parameters.


def regression_mse(params, x, y):
  return jnp.mean((mlp_apply(params, x) - y) ** 2)


def train_bf16_params(mode: str, epochs: int = 20, seed: int = 0,
                      learning_rate: float = 3e-4, batch_size: int = 64):
  """The regression data fitted by a 8 → 64 → 64 → 1 MLP whose parameters
  are float32 (``mode="float32"``) or bfloat16, updated with round-to-nearest
  (``"bfloat16"``) or with ``jadam.stochastic_rounding`` (``"bfloat16 +
  stochastic rounding"``). Moments are float32 in all three, so only the
  parameter rounding differs. Returns the full-data MSE after each epoch."""
  x, y = quickstart.make_regression(seed=seed)
  dtype = jnp.float32 if mode == "float32" else jnp.bfloat16
  params = mlp_init(jax.random.PRNGKey(seed), (x.shape[1], 64, 64, 1), dtype)
  tx = jadam.adam(learning_rate, mu_dtype=jnp.float32, nu_dtype=jnp.float32)
  if mode.endswith("stochastic rounding"):
    tx = optax.chain(tx, jadam.stochastic_rounding(seed))
  _, _, losses = _fit(params, tx, regression_mse, jnp.asarray(x),
                      jnp.asarray(y), epochs, batch_size, seed)
  return losses


BF16_MODES = ("float32", "bfloat16", "bfloat16 + stochastic rounding")


# --------------------------------------------------------------------------
# 4. Step time per storage format, side by side.


def time_steps(size: int, rounds: int = 15) -> dict:
  """Median ms of a jitted, donated ``jadam.adam`` step on one float32 leaf
  of ``size`` elements, per moment storage; the formats are stepped in turn
  so that load changes on the machine hit them alike."""
  key = jax.random.PRNGKey(0)
  grads = {"w": 1e-3 * jax.random.normal(key, (size,))}
  runs = {}
  for name in ("float32", "bfloat16", "int8"):
    opt = jadam.adam(1e-3, **STORAGES[name])

    def step(params, state, grads, opt=opt):
      updates, state = opt.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    params = {"w": jax.random.normal(key, (size,))}
    state = opt.init(params)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
        params, state, grads).compile()
    params, state = compiled(params, state, grads)  # warm-up
    runs[name] = [compiled, params, state, []]
  for _ in range(rounds):
    for run in runs.values():
      start = time.perf_counter()
      run[1], run[2] = run[0](run[1], run[2], grads)
      jax.block_until_ready((run[1], run[2]))
      run[3].append(time.perf_counter() - start)
  return {name: 1e3 * float(np.median(run[3])) for name, run in runs.items()}


def time_parts(size: int, rounds: int = 11) -> dict:
  """Median ms of each piece of an int8 step, as one jitted whole-array
  operation on ``size`` float32 elements (interleaved rounds)."""
  from jadam import _rounding  # pylint: disable=g-import-not-at-top
  from jadam._formats import _codes as _quant  # pylint: disable=g-import-not-at-top
  x = 0.1 * jax.random.normal(jax.random.PRNGKey(0), (size,))
  signed_codes, _ = _quant.quantize(x, True)
  unsigned_codes, _ = _quant.quantize(x * x, False)
  bits = lambda: _rounding.random_bits((size,), jnp.uint32(3))
  table = jnp.asarray(_quant.code_map(True)[1])
  parts = {
      "x * 2 (read and write float32: the memory floor)": (
          lambda x: x * 2.0, x),
      "random bits": (lambda x: bits(), x),
      "decode int8 codes": (_quant.decode, signed_codes),
      "decode uint8 codes": (_quant.decode, unsigned_codes),
      "encode int8, nearest": (lambda x: _quant.encode(x, True), x),
      "encode int8, stochastic": (
          lambda x: _quant.encode(x, True, bits()), x),
      "encode uint8, stochastic": (
          lambda x: _quant.encode(jnp.abs(x), False, bits()), x),
      "block maxima, blocks of 256": (
          lambda x: _quant.block_scales(x.reshape(-1, 256)), x),
      "decode int8 by a gather from the code table": (
          lambda c: table[c.astype(jnp.int32) + 128], signed_codes),
  }
  compiled = {name: (jax.jit(f).lower(a).compile(), a)
              for name, (f, a) in parts.items()}
  times = {name: [] for name in parts}
  for _ in range(rounds):
    for name, (f, a) in compiled.items():
      start = time.perf_counter()
      jax.block_until_ready(f(a))
      times[name].append(time.perf_counter() - start)
  return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


# --------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
  """The command line (see the module docstring)."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="fewer epochs (a smoke run)")
  parser.add_argument("--plot", type=pathlib.Path, nargs="?", default=None,
                      const=DEFAULT_OUT, metavar="DIR",
                      help="write the PNG figures into DIR, made if needed "
                      f"(without DIR: ./{DEFAULT_OUT}; docs/img refreshes "
                      "the committed figures)")
  parser.add_argument("--speed", type=int, nargs="*", metavar="SIZE",
                      help="only time steps on one leaf of each SIZE")
  parser.add_argument("--parts", type=int, nargs="?", const=1 << 22,
                      metavar="SIZE", help="only time the pieces of an int8 "
                      "step on SIZE elements")
  parser.add_argument("--default-xla-flags", action="store_true",
                      help="with --speed or --parts: leave XLA:CPU "
                      "multi-output fusion off")
  return parser.parse_args(argv)


def main(argv=None) -> dict:
  """Run the experiments, or with ``--speed`` / ``--parts`` the timings.

  Returns:
    experiment → storage or mode → per-epoch losses (empty for timings).
  """
  args = parse_args(argv)
  if (args.speed is not None or args.parts is not None) and not (
      args.default_xla_flags):
    jadam.enable_cpu_fusion()  # before the first computation, as the bench
  if args.parts is not None:
    print(f"| operation on {args.parts:,} elements | ms |")
    print("| --- | ---: |")
    for name, ms in time_parts(args.parts).items():
      print(f"| {name} | {ms:.1f} |")
    return {}
  if args.speed is not None:
    print("| parameters | float32 ms | bfloat16 ms | int8 ms | int8 / float32 |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for size in args.speed or [1 << 22]:
      ms = time_steps(size)
      print(f"| {size:,} | {ms['float32']:.1f} | {ms['bfloat16']:.1f} | "
            f"{ms['int8']:.1f} | {ms['int8'] / ms['float32']:.1f} |", flush=True)
    return {}
  reg_epochs, digit_epochs, bf16_epochs = (3, 5, 4) if args.quick else (10, 30, 20)
  results = {"regression": {}, "digits": {}, "bf16_params": {}}

  print(f"## Quickstart regression, {reg_epochs} epochs\n")
  print("| moments | final epoch loss | vs float32 | full-data MSE |")
  print("| --- | --- | --- | --- |")
  for name, storage in STORAGES.items():
    start = time.perf_counter()
    losses, mse = train_regression(storage, reg_epochs)
    results["regression"][name] = losses
    base = results["regression"]["float32"][-1]
    print(f"| {name} | {losses[-1]:.4f} | {100 * (losses[-1] / base - 1):+.2f}% "
          f"| {mse:.4f} |  <!-- {time.perf_counter() - start:.0f} s -->",
          flush=True)

  print(f"\n## Digits MLP, {digit_epochs} epochs\n")
  print("| moments | final train loss | vs float32 | test accuracy | "
        "state bytes / param |")
  print("| --- | --- | --- | --- | --- |")
  n_params = sum(p.size for p in jax.tree.leaves(mlp_init(jax.random.PRNGKey(0))))
  for name, storage in STORAGES.items():
    losses, accuracy, nbytes = train_digits(storage, digit_epochs)
    results["digits"][name] = losses
    base = results["digits"]["float32"][-1]
    print(f"| {name} | {losses[-1]:.5f} | {100 * (losses[-1] / base - 1):+.2f}% "
          f"| {accuracy:.2f}% | {nbytes / n_params:.3f} |", flush=True)

  print(f"\n## bfloat16 parameters, {bf16_epochs} epochs\n")
  print("| parameters | MSE after epoch 1 | final MSE |")
  print("| --- | --- | --- |")
  for mode in BF16_MODES:
    losses = train_bf16_params(mode, bf16_epochs)
    results["bf16_params"][mode] = losses
    print(f"| {mode} | {losses[0]:.4f} | {losses[-1]:.4f} |", flush=True)

  if args.plot is not None:
    _plot(results, args.plot)
  return results


def _plot(results: dict, directory: pathlib.Path) -> None:
  """Write the two figures into ``directory`` and print their paths."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  directory.mkdir(parents=True, exist_ok=True)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, key, title, ylabel in [
      (axes[0], "regression", "Quickstart regression", "mean training loss (MSE)"),
      (axes[1], "digits", "Digits MLP", "training cross-entropy")]:
    for name, losses in results[key].items():
      ax.plot(range(1, len(losses) + 1), losses, label=name,
              linestyle="--" if "int8" in name else "-")
    ax.set(title=title, xlabel="epoch", ylabel=ylabel, yscale="log")
    ax.legend()
  fig.suptitle("Adam moments stored in float32, bfloat16, float16 and int8 "
               "(2-core CPU)")
  fig.tight_layout()
  path = directory / "memory_storage.png"
  fig.savefig(path, dpi=110)
  plt.close(fig)
  print(f"wrote {path}", flush=True)
  fig, ax = plt.subplots(figsize=(6, 4))
  for mode, losses in results["bf16_params"].items():
    ax.plot(range(1, len(losses) + 1), losses, label=mode)
  ax.set(title="bfloat16 parameters, Adam lr 3e-4", xlabel="epoch",
         ylabel="full-data MSE", yscale="log")
  ax.legend()
  fig.tight_layout()
  path = directory / "memory_bf16_params.png"
  fig.savefig(path, dpi=110)
  plt.close(fig)
  print(f"wrote {path}", flush=True)


if __name__ == "__main__":
  main()

"""Healthy training runs, to check that ``jadam.doctor`` raises no false alarm.

Each run trains a small model the way its kind of model is usually trained,
with nothing wrong on purpose, and returns its per-step losses and its final
optimizer state. A harness passes ``make_tx``, which wraps the run's whole
optimizer (``jadam.doctor``; the identity by default), so the same run can be
compared with and without the doctor. None of these runs was used to choose
the doctor's thresholds: what the doctor says on them is its false-alarm rate.

Runs (``RUNS`` maps each name to its function and a one-line description):

* ``lm``: a byte-level decoder-only transformer language model in Flax Linen,
  trained as Flax's lm1b example trains (pre-LN blocks, causal self-attention
  with a padding mask, cross-entropy weighted by the padding, linear warmup
  then a reciprocal-square-root decay, AdamW with β2 = 0.98 and ε = 1e-9),
  on lines of Python standard-library source.
* ``vae``: a variational autoencoder in Flax NNX on scikit-learn's 8×8
  digits, with block-wise int8 moments (its big kernels really are int8).
* ``quickstart``, ``flax_nnx``, ``flax_linen``, ``flat_flax``: the
  repository's examples' own models, data and optimizers; ``flax_linen``
  keeps its moments in bfloat16 and ``flat_flax`` steps a ``jadam.FlatView``.

Each run is a function ``run_<name>(make_tx, steps, seed=0)`` returning
``dict(losses=np.ndarray, state=final optimizer state)``. ``make_tx(inner)``
returns the optimizer to train with; runs on a ``FlatView`` call
``make_tx(inner, view=view)``, which ``jadam.doctor`` accepts as is.

The command line prints, per run, the steps, the loss at the start and the
end (means of the first and last ten steps), the wall time and what
``jadam.diagnose`` finds (a healthy run: nothing):

    python benchmarks/doctor_runs.py                  # every run, default steps
    python benchmarks/doctor_runs.py --steps 200 lm vae
    python benchmarks/doctor_runs.py --no-doctor      # the runs alone
    python benchmarks/doctor_runs.py --quick          # smoke test, no verdict

Only public API is used (``jadam``, ``optax``, ``jax``, ``flax``), and the
examples are imported from the clone's ``examples/`` folder.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import sysconfig
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.training import train_state

import jadam

# The examples import each other by module name (flax_linen imports
# flax_nnx), so their folder goes on the path rather than being a package.
_EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "examples")
if _EXAMPLES not in sys.path:
  sys.path.insert(0, _EXAMPLES)

import flat_flax  # pylint: disable=g-import-not-at-top,wrong-import-position
import flax_linen  # pylint: disable=g-import-not-at-top,wrong-import-position
import flax_nnx  # pylint: disable=g-import-not-at-top,wrong-import-position
import quickstart  # pylint: disable=g-import-not-at-top,wrong-import-position

MakeTx = Callable[..., optax.GradientTransformation]


def no_doctor(inner: optax.GradientTransformation,
              **context: Any) -> optax.GradientTransformation:
  """The default ``make_tx``: train with the run's own optimizer."""
  del context
  return inner


def _result(losses: list, state: Any) -> dict:
  # Losses stay on the device until the end, so the loop never waits for
  # a step to finish before dispatching the next.
  return dict(losses=np.asarray(jax.device_get(losses), np.float32),
              state=state)


# -----------------------------------------------------------------------------
# lm: a byte-level transformer language model (Flax Linen), trained as lm1b.
# -----------------------------------------------------------------------------

# Standard-library modules present in every supported Python: plain source,
# a few hundred kilobytes, readable offline.
_CORPUS_MODULES = ("argparse.py", "textwrap.py", "functools.py",
                   "dataclasses.py", "string.py", "shlex.py", "difflib.py",
                   "fractions.py", "heapq.py", "bisect.py")
PAD = 0   # byte 0 never occurs in source text, so it can mark padding


def corpus_lines() -> list[bytes]:
  """Non-empty lines of a few standard-library modules, as bytes."""
  stdlib = sysconfig.get_paths()["stdlib"]
  lines = []
  for name in _CORPUS_MODULES:
    path = os.path.join(stdlib, name)
    if os.path.exists(path):
      with open(path, "rb") as f:
        lines.extend(line for line in f.read().split(b"\n") if line.strip())
  if not lines:
    raise FileNotFoundError(f"none of {_CORPUS_MODULES} found in {stdlib}")
  return lines


def lm_batches(lines: list[bytes], steps: int, batch_size: int, length: int,
               seed: int) -> np.ndarray:
  """``steps`` batches of padded examples, ``[steps, batch, length]`` int32.

  Like lm1b's sentences, each example is a run of whole consecutive lines
  (the first cut at ``length`` bytes if it is longer) followed by padding,
  so the loss weights and the attention's padding mask have work to do.
  """
  rng = np.random.default_rng(seed)
  out = np.full((steps, batch_size, length), PAD, np.int32)
  for step in range(steps):
    for row, first in enumerate(rng.integers(len(lines), size=batch_size)):
      text = lines[first][:length]
      for line in lines[first + 1:]:
        if len(text) + 1 + len(line) > length:
          break
        text += b"\n" + line
      out[step, row, :len(text)] = np.frombuffer(text, np.uint8)
  return out


class DecoderBlock(nn.Module):
  """Pre-LN block: x + attention(LN(x)), then x + MLP(LN(x))."""

  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x, mask):
    init = nn.initializers.xavier_uniform()
    bias_init = nn.initializers.normal(stddev=1e-6)
    y = nn.SelfAttention(num_heads=self.num_heads, kernel_init=init,
                         use_bias=False, deterministic=True)(nn.LayerNorm()(x),
                                                             mask=mask)
    x = x + y
    y = nn.Dense(self.mlp_dim, kernel_init=init, bias_init=bias_init)(
        nn.LayerNorm()(x))
    y = nn.Dense(x.shape[-1], kernel_init=init, bias_init=bias_init)(
        nn.relu(y))
    return x + y


class ByteLM(nn.Module):
  """A decoder-only transformer over bytes, in lm1b's layout.

  Token embeddings (normal, stddev 1, as lm1b) plus learned position
  embeddings; the inputs are the targets shifted right by one, with the
  padding id as the start token; a causal mask combined with a padding mask;
  a final LayerNorm and an untied output projection. No dropout: a few
  hundred steps of a tiny model underfit, and dropout would only add noise.
  """

  vocab_size: int = 256
  emb_dim: int = 64
  num_heads: int = 4
  num_layers: int = 2
  mlp_dim: int = 256
  max_len: int = 64

  @nn.compact
  def __call__(self, tokens):
    mask = nn.combine_masks(
        nn.make_attention_mask(tokens > PAD, tokens > PAD),
        nn.make_causal_mask(tokens))
    shifted = jnp.pad(tokens, ((0, 0), (1, 0)))[:, :-1]
    x = nn.Embed(self.vocab_size, self.emb_dim,
                 embedding_init=nn.initializers.normal(stddev=1.0))(shifted)
    positions = self.param("pos_embedding",
                           nn.initializers.normal(stddev=0.02),
                           (self.max_len, self.emb_dim))
    x = x + positions[:tokens.shape[1]]
    for _ in range(self.num_layers):
      x = DecoderBlock(self.num_heads, self.mlp_dim)(x, mask)
    x = nn.LayerNorm()(x)
    return nn.Dense(self.vocab_size,
                    kernel_init=nn.initializers.xavier_uniform(),
                    bias_init=nn.initializers.normal(stddev=1e-6))(x)


def weighted_cross_entropy(logits, targets):
  """Mean cross-entropy over the non-padding positions."""
  weights = (targets > PAD).astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(losses * weights) / jnp.sum(weights)


def rsqrt_schedule(peak: float, warmup_steps: int) -> optax.Schedule:
  """Linear warmup to ``peak``, then ``peak·sqrt(warmup / step)``, as lm1b."""
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup_steps),
       lambda count: peak * jnp.sqrt(warmup_steps / (count + warmup_steps))],
      boundaries=[warmup_steps])


def run_lm(make_tx: MakeTx = no_doctor, steps: int = 300, seed: int = 0,
           batch_size: int = 16, length: int = 64) -> dict:
  """The byte-level language model, AdamW in float32 (lm1b's settings)."""
  batches = lm_batches(corpus_lines(), steps, batch_size, length, seed)
  model = ByteLM(max_len=length)
  params = model.init(jax.random.PRNGKey(seed), batches[0])["params"]
  # lm1b decays every parameter, with its β2, ε and weight decay; the peak
  # and the warmup are scaled down to a run of a few hundred steps.
  tx = jadam.adamw(rsqrt_schedule(3e-3, warmup_steps=min(30, steps)),
                   b1=0.9, b2=0.98, eps=1e-9, weight_decay=0.1)
  state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=make_tx(tx))

  @jax.jit
  def train_step(state, tokens):
    def loss_fn(params):
      return weighted_cross_entropy(state.apply_fn({"params": params}, tokens),
                                    tokens)
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  losses = []
  for tokens in batches:
    state, loss = train_step(state, tokens)
    losses.append(loss)
  return _result(losses, state.opt_state)


# -----------------------------------------------------------------------------
# vae: a variational autoencoder on digits (Flax NNX), int8 moments.
# -----------------------------------------------------------------------------


class VAE(nnx.Module):
  """MLP encoder to a Gaussian posterior, MLP decoder to Bernoulli logits.

  The 64×256 and 256×64 kernels (16,384 entries) and the 256×16 encoder
  head (4,096) are at least ``BlockwiseInt8``'s default ``min_size``, so
  their moments are int8; the biases and the 8×256 decoder input stay
  float32, as they would in any model.
  """

  def __init__(self, n_in: int, hidden: int, latent: int, rngs: nnx.Rngs):
    self.encoder = nnx.Linear(n_in, hidden, rngs=rngs)
    self.posterior = nnx.Linear(hidden, 2 * latent, rngs=rngs)
    self.decoder = nnx.Linear(latent, hidden, rngs=rngs)
    self.likelihood = nnx.Linear(hidden, n_in, rngs=rngs)
    self.rngs = rngs

  def __call__(self, x):
    mean, logvar = jnp.split(self.posterior(nnx.relu(self.encoder(x))), 2, -1)
    # Reparameterisation: the noise comes from the model's own stream, so
    # each step draws afresh inside nnx.jit.
    noise = jax.random.normal(self.rngs.noise(), mean.shape)
    z = mean + jnp.exp(0.5 * logvar) * noise
    return self.likelihood(nnx.relu(self.decoder(z))), mean, logvar


def vae_loss(model: VAE, x):
  """Negative ELBO per example: Bernoulli reconstruction plus KL, in nats."""
  logits, mean, logvar = model(x)
  reconstruction = optax.sigmoid_binary_cross_entropy(logits, x).sum(-1)
  kl = 0.5 * jnp.sum(jnp.exp(logvar) + mean**2 - 1.0 - logvar, axis=-1)
  return jnp.mean(reconstruction + kl)


@nnx.jit
def _vae_step(model, optimizer, x):
  loss, grads = nnx.value_and_grad(vae_loss)(model, x)
  optimizer.update(model, grads)
  return loss


def run_vae(make_tx: MakeTx = no_doctor, steps: int = 600, seed: int = 0,
            batch_size: int = 64) -> dict:
  """The digits VAE, Adam with block-wise int8 first and second moments."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  x = (load_digits().data / 16.0).astype(np.float32)   # pixels 0..16 -> [0, 1]
  model = VAE(x.shape[1], 256, 8, nnx.Rngs(params=seed, noise=seed + 1))
  tx = jadam.adam(1e-3, mu_dtype=jadam.BlockwiseInt8(),
                  nu_dtype=jadam.BlockwiseInt8())
  optimizer = nnx.Optimizer(model, make_tx(tx), wrt=nnx.Param)
  rng = np.random.default_rng(seed)
  losses = []
  for batch in _epochs(rng, len(x), batch_size, steps):
    losses.append(_vae_step(model, optimizer, x[batch]))
  return _result(losses, optimizer.opt_state)


def _epochs(rng: np.random.Generator, n: int, batch_size: int, steps: int):
  """``steps`` minibatch index arrays, reshuffled every epoch."""
  per_epoch = n // batch_size
  for step in range(steps):
    if step % per_epoch == 0:
      order = rng.permutation(n)
    i = step % per_epoch
    yield order[i * batch_size:(i + 1) * batch_size]


# -----------------------------------------------------------------------------
# The repository's examples, with their own models, data and optimizers.
# -----------------------------------------------------------------------------


def run_quickstart(make_tx: MakeTx = no_doctor, steps: int = 1280,
                   seed: int = 0) -> dict:
  """examples/quickstart.py: clip, ``jadam.scale_by_adam``, warmup-cosine."""
  x, y = quickstart.make_regression(seed=seed)
  batch_size, peak = 32, 3e-3   # the example's defaults
  steps_per_epoch = len(x) // batch_size
  epochs = math.ceil(steps / steps_per_epoch)
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=steps_per_epoch // 2,
      decay_steps=epochs * steps_per_epoch, end_value=peak / 20)
  tx = optax.chain(optax.clip_by_global_norm(1.0), jadam.scale_by_adam(),
                   optax.scale_by_learning_rate(schedule))
  model = quickstart.Regressor(x.shape[1],
                               nnx.Rngs(params=seed, dropout=seed + 1))
  optimizer = nnx.Optimizer(model, make_tx(tx), wrt=nnx.Param)
  model.train()
  rng = np.random.default_rng(seed)
  losses = [quickstart.train_step(model, optimizer, x[batch], y[batch])
            for batch in _epochs(rng, len(x), batch_size, steps)]
  return _result(losses, optimizer.opt_state)


def _digits_setup(steps: int, seed: int):
  """The Flax examples' data, arguments and schedule for ``steps`` steps."""
  args = flax_nnx.parse_args(["--seed", str(seed)], "")
  x_train, y_train, _, _ = flax_nnx.load_digits_split(seed)
  steps_per_epoch = len(x_train) // args.batch_size
  args.epochs = math.ceil(steps / steps_per_epoch)
  return args, x_train, y_train, flax_nnx.warmup_cosine(args, steps_per_epoch)


def run_flax_nnx(make_tx: MakeTx = no_doctor, steps: int = 220,
                 seed: int = 0) -> dict:
  """examples/flax_nnx.py: AdamW in float32, kernels decayed only."""
  args, x, y, schedule = _digits_setup(steps, seed)
  model = flax_nnx.Classifier(x.shape[1], 128, 10,
                              nnx.Rngs(params=seed, dropout=seed + 1))
  tx = jadam.adamw(schedule, weight_decay=args.weight_decay,
                   mask=flax_nnx.decay_mask)
  optimizer = nnx.Optimizer(model, make_tx(tx), wrt=nnx.Param)
  model.train()
  rng = np.random.default_rng(seed)
  losses = [flax_nnx.train_step(model, optimizer, x[batch], y[batch])
            for batch in _epochs(rng, len(x), args.batch_size, steps)]
  return _result(losses, optimizer.opt_state)


def run_flax_linen(make_tx: MakeTx = no_doctor, steps: int = 220,
                   seed: int = 0) -> dict:
  """examples/flax_linen.py (BatchNorm, TrainState), moments in bfloat16."""
  args, x, y, schedule = _digits_setup(steps, seed)
  tx = jadam.adamw(schedule, weight_decay=args.weight_decay,
                   mask=flax_linen.decay_mask, mu_dtype=jnp.bfloat16,
                   nu_dtype=jnp.bfloat16)
  state = flax_linen.create_state(make_tx(tx), x.shape[1], seed)
  rng = np.random.default_rng(seed)
  losses = []
  for batch in _epochs(rng, len(x), args.batch_size, steps):
    state, loss = flax_linen.train_step(state, x[batch], y[batch])
    losses.append(loss)
  return _result(losses, state.opt_state)


def run_flat_flax(make_tx: MakeTx = no_doctor, steps: int = flat_flax.STEPS,
                  seed: int = 0, width: int = flat_flax.WIDTH,
                  depth: int = flat_flax.DEPTH) -> dict:
  """examples/flat_flax.py's NNX recipe: AdamW on a ``jadam.FlatView``.

  The view holds ``depth`` residual blocks of four tensors (a Linear's
  kernel and bias, a LayerNorm's scale and bias); the doctor measures each
  tensor under its own path.
  """
  model = flat_flax.Mlp(width, depth, nnx.Rngs(seed))
  x, y = flat_flax.data(width, seed)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  view = jadam.FlatView(params, groups=flat_flax.decay_mask)
  tx = make_tx(jadam.adamw(1e-3, weight_decay=1e-2,
                           mask=view.mask(flat_flax.decay_mask)), view=view)
  flat = view.ravel(params)
  state = tx.init(flat)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(flat, state):
    def loss_fn(flat):
      model = nnx.merge(graphdef, view.unravel(flat), rest, copy=True)
      return jnp.mean((model(x) - y) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(flat)
    updates, state = tx.update(grads, state, flat)
    return optax.apply_updates(flat, updates), state, loss

  losses = []
  for _ in range(steps):
    flat, state, loss = train_step(flat, state)
    losses.append(loss)
  return _result(losses, state)


RUNS: dict[str, tuple[Callable[..., dict], str]] = {
    "lm": (run_lm, "Linen byte-level transformer LM, adamw float32"),
    "vae": (run_vae, "NNX digits VAE, adam int8 moments"),
    "quickstart": (run_quickstart, "examples/quickstart, chain(clip, "
                   "scale_by_adam, schedule)"),
    "flax_nnx": (run_flax_nnx, "examples/flax_nnx, adamw float32 masked"),
    "flax_linen": (run_flax_linen, "examples/flax_linen, adamw bfloat16 "
                   "moments"),
    "flat_flax": (run_flat_flax, "examples/flat_flax, adamw on a FlatView"),
}


def loss_ends(losses: np.ndarray, window: int = 10) -> tuple[float, float]:
  """Mean loss of the first and of the last ``window`` steps."""
  window = max(min(window, len(losses) // 2), 1)
  return float(np.mean(losses[:window])), float(np.mean(losses[-window:]))


def main(argv=None) -> dict[str, dict]:
  """Run the selected runs with (or without) the doctor and print a summary."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("runs", nargs="*", metavar="RUN",
                      help=f"runs to do (default: all of {', '.join(RUNS)})")
  parser.add_argument("--steps", type=int, default=None,
                      help="steps of every run (default: each run's own)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--every", type=int, default=10,
                      help="the doctor measures every this many steps")
  parser.add_argument("--no-doctor", action="store_true",
                      help="train without jadam.doctor (no findings)")
  parser.add_argument("--quick", action="store_true",
                      help="20 steps per run: a smoke test, no verdict")
  args = parser.parse_args(argv)
  unknown = [name for name in args.runs if name not in RUNS]
  if unknown:
    parser.error(f"unknown run(s) {', '.join(unknown)}; choose from "
                 f"{', '.join(RUNS)}")
  steps = 20 if args.quick and args.steps is None else args.steps
  if args.quick:
    print("Quick smoke test (--quick): too few steps to judge health.")
  device = jax.devices()[0]
  print(f"JAX {jax.__version__}, Flax {_flax_version()} on {device.platform}"
        f" ({device.device_kind})", flush=True)

  if args.no_doctor:
    make_tx = no_doctor
  else:
    make_tx = lambda inner, **context: jadam.doctor(  # noqa: E731
        inner, every=args.every, **context)
  results = {}
  for name in args.runs or RUNS:
    run, description = RUNS[name]
    kwargs = {} if steps is None else {"steps": steps}
    start = time.perf_counter()
    result = run(make_tx, seed=args.seed, **kwargs)
    seconds = time.perf_counter() - start
    first, last = loss_ends(result["losses"])
    findings = None if args.no_doctor else jadam.diagnose(result["state"])
    verdict = ("-" if findings is None else
               "no findings" if not findings else f"{len(findings)} finding(s)")
    print(f"{name:<11} {len(result['losses']):>5} steps  loss {first:.4f} -> "
          f"{last:.4f} ({last / first:.2f}x)  {seconds:6.1f} s  {verdict}  "
          f"[{description}]", flush=True)
    if findings:
      print(findings, flush=True)
    results[name] = dict(result, seconds=seconds, findings=findings)
  return results


def _flax_version() -> str:
  import flax  # pylint: disable=g-import-not-at-top
  return flax.__version__


if __name__ == "__main__":
  main()

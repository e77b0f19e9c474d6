"""Exact resume: periodic orbax checkpoints of parameters and optimizer state.

A small MLP regression trains with

    jadam.with_telemetry(jadam.skip_nonfinite(jadam.adamw(lr)))

for ``--steps`` steps and saves {params, opt_state} every
``--checkpoint-every`` steps with an orbax ``CheckpointManager`` that keeps
the last ``--keep`` checkpoints. Started again with the same ``--dir``, it
restores the latest checkpoint into abstract targets made by
``jax.eval_shape`` (no real arrays are built just to be overwritten) and
continues. Batches are a pure function of (seed, step), so the resumed run
sees exactly the batches the uninterrupted one would have, and the final
parameters are bitwise identical however often the run is killed.

Try it:

    python examples/resume.py --dir /tmp/run --kill-at 37   # dies by SIGKILL
    python examples/resume.py --dir /tmp/run --out a.npz    # resumes, at 30
                                                            # or 20 if 30 was
                                                            # still being saved
    python examples/resume.py --dir /tmp/ref --out b.npz    # straight through
    # a.npz and b.npz hold the same bits

(how long a run takes: docs/durations.md)
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import jadam

N_FEATURES = 8


def init_params(seed: int):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return {"hidden": {"kernel": jax.random.normal(k1, (N_FEATURES, 32))
                               / np.sqrt(N_FEATURES),
                     "bias": jnp.zeros(32)},
          "out": {"kernel": jax.random.normal(k2, (32, 1)) / np.sqrt(32),
                  "bias": jnp.zeros(1)}}


def batch(seed: int, step: int, size: int = 64):
  """The batch of ``step``: a pure function of (seed, step), nothing stored.

  With a stateful data loader its position must be checkpointed too (orbax
  can save it alongside, e.g. with ``ocp.args.JsonSave``).
  """
  key = jax.random.fold_in(jax.random.PRNGKey(seed + 1), step)
  x = jax.random.normal(key, (size, N_FEATURES))
  w = jnp.linspace(-1.0, 1.0, N_FEATURES)
  return x, jnp.sin(x @ w)[:, None] + 0.5 * (x[:, :1] ** 2)


def loss_fn(params, x, y):
  h = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  out = h @ params["out"]["kernel"] + params["out"]["bias"]
  return jnp.mean((out - y) ** 2)


def make_optimizer(learning_rate: float) -> optax.GradientTransformation:
  return jadam.with_telemetry(jadam.skip_nonfinite(
      jadam.adamw(learning_rate, weight_decay=1e-4)))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dir", required=True, help="checkpoint directory")
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--checkpoint-every", type=int, default=10)
  parser.add_argument("--keep", type=int, default=3,
                      help="how many recent checkpoints to keep")
  parser.add_argument("--learning-rate", type=float, default=1e-2)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--kill-at", type=int, default=0,
                      help="SIGKILL this process right after this step, "
                           "to simulate a crash (0: never)")
  parser.add_argument("--sleep", type=float, default=0.0,
                      help="seconds to wait per step (a stand-in for a "
                           "slower model, so a run can be killed by hand)")
  parser.add_argument("--out", help="write the final parameters here (.npz)")
  args = parser.parse_args(argv)

  opt = make_optimizer(args.learning_rate)

  @jax.jit
  def train_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  manager = ocp.CheckpointManager(
      pathlib.Path(args.dir).resolve(),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=args.keep, save_interval_steps=args.checkpoint_every))

  start = manager.latest_step()
  if start is None:
    start = 0
    params = init_params(args.seed)
    opt_state = opt.init(params)
    print("starting from scratch", flush=True)
  else:
    # Abstract targets: shapes, dtypes and the exact pytree structure
    # (NamedTuples of jadam's and optax's states) without computing anything.
    abstract_params = jax.eval_shape(init_params, args.seed)
    target = {"params": abstract_params,
              "opt_state": jax.eval_shape(opt.init, abstract_params)}
    restored = manager.restore(start, args=ocp.args.StandardRestore(target))
    params, opt_state = restored["params"], restored["opt_state"]
    print(f"resumed from step {start}", flush=True)

  for step in range(start, args.steps):
    x, y = batch(args.seed, step)
    params, opt_state, loss = train_step(params, opt_state, x, y)
    done = step + 1
    # Saves only every --checkpoint-every steps; asynchronous, so training
    # continues while the previous checkpoint is written.
    if manager.save(done, args=ocp.args.StandardSave(
        {"params": params, "opt_state": opt_state})):
      health = jadam.stats(opt_state)
      print(f"step {done}: loss {float(loss):.5f}, grad norm "
            f"{float(health['grad_norm']):.4f}, checkpoint saved", flush=True)
    if done == args.kill_at:
      print(f"step {done}: killing myself with SIGKILL", flush=True)
      os.kill(os.getpid(), signal.SIGKILL)
    if args.sleep:
      time.sleep(args.sleep)
  manager.wait_until_finished()
  manager.close()

  final_loss = float(loss_fn(params, *batch(args.seed, args.steps)))
  print(f"finished {args.steps} steps, held-out batch loss {final_loss:.5f}")
  flat = {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in
          jax.tree_util.tree_flatten_with_path(params)[0]}
  if args.out:
    np.savez(args.out, **flat)
    # np.savez adds the suffix when it is missing; print the real name.
    written = args.out if args.out.endswith(".npz") else args.out + ".npz"
    print(f"wrote {written}", flush=True)
  return flat


if __name__ == "__main__":
  main()

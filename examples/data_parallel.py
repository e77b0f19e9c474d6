"""Data-parallel training of the quickstart model over several processes.

The quickstart ``Regressor`` (Dense(32, relu) -> Dropout(0.2) -> Dense(1)) is
trained with the quickstart optimizer

    optax.chain(optax.clip_by_global_norm(1.0), jadam.scale_by_adam(),
                optax.scale_by_learning_rate(schedule))

on a mesh with one ``"data"`` axis spanning every device of every process.
Each global batch of 32 rows is split over the devices; parameters are
replicated; the gradient all-reduce is inserted by ``jax.jit``. With
``--zero1`` the optimizer state is split over the devices instead of
replicated (:func:`jadam.sharding.zero1`).

Dropout stays on. Its masks are drawn for the *global* batch from the same
key in every run, and JAX's random bits do not depend on how an array is
sharded (``jax_threefry_partitionable``, on by default), so one process and
N processes drop exactly the same units and train the same model.

Run:

    # two processes on this machine (launches itself twice), then one
    # process, and compares the two:
    python examples/data_parallel.py --num-processes 2

    # one process of a multi-host job (run once per host, same coordinator):
    python examples/data_parallel.py --num-processes 2 --process-id 0 \\
        --coordinator 10.0.0.1:1234

    # plain single-process training:
    python examples/data_parallel.py

On CPU, cross-process collectives use gloo
(``jax_cpu_collectives_implementation``); on GPU and TPU hosts JAX uses
NCCL / ICI and the script runs unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num-processes", type=int, default=1)
  parser.add_argument("--process-id", type=int, default=None,
                      help="run as this process of a multi-process job; "
                      "without it and with --num-processes > 1, launch all "
                      "processes here")
  parser.add_argument("--coordinator", default=None,
                      help="host:port of process 0 (default: a free local "
                      "port when launching)")
  parser.add_argument("--epochs", type=int, default=2)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--learning-rate", type=float, default=3e-3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--samples", type=int, default=4096,
                      help="size of the generated regression data set")
  parser.add_argument("--zero1", action="store_true",
                      help="split the optimizer state over the data axis")
  parser.add_argument("--out", default=None,
                      help="write the results of process 0 here as JSON")
  parser.add_argument("--timeout", type=float, default=600.0,
                      help="seconds before launched processes are killed")
  return parser.parse_args(argv)


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def train(args) -> dict:
  """Train in this process (one of ``args.num_processes``); return results."""
  import jax  # pylint: disable=g-import-not-at-top
  if args.num_processes > 1:
    # gloo is already the default; named here because without a CPU
    # collectives implementation cross-process all-reduces fail.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        num_processes=args.num_processes, process_id=args.process_id,
        initialization_timeout=120)
  import optax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

  import jadam  # pylint: disable=g-import-not-at-top
  from quickstart import Regressor, make_regression  # pylint: disable=g-import-not-at-top

  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))
  if args.batch_size % jax.device_count():
    raise ValueError(f"--batch-size {args.batch_size} must divide evenly "
                     f"over {jax.device_count()} devices.")

  x, y = make_regression(n_samples=args.samples, seed=args.seed)
  steps_per_epoch = len(x) // args.batch_size
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=args.learning_rate,
      warmup_steps=steps_per_epoch // 2,
      decay_steps=args.epochs * steps_per_epoch,
      end_value=args.learning_rate / 20)
  tx = optax.chain(optax.clip_by_global_norm(1.0), jadam.scale_by_adam(),
                   optax.scale_by_learning_rate(schedule))
  if args.zero1:
    tx = jadam.sharding.zero1(tx, mesh, "data")

  def build():
    model = Regressor(x.shape[1],
                      nnx.Rngs(params=args.seed, dropout=args.seed + 1))
    model.train()
    return nnx.split(model, nnx.Param, nnx.RngState)

  graphdef = build()[0]
  # Created inside jit so that every process holds the same replicated
  # global arrays without shipping host data around.
  params, rngs = jax.jit(lambda: build()[1:], out_shardings=replicated)()
  opt_state = tx.init(params)

  def mse(model, xb, yb):
    return jnp_mean_sq(model(xb) - yb)

  @jax.jit
  def train_step(params, rngs, opt_state, xb, yb):
    model = nnx.merge(graphdef, params, rngs)
    loss, grads = nnx.value_and_grad(mse)(model, xb, yb)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates),
            nnx.state(model, nnx.RngState), opt_state, loss)

  def global_batch(rows):
    # Each process fills in only the rows of its own devices.
    return [jax.make_array_from_callback(
        (len(rows),) + a.shape[1:], batch_sharding,
        lambda index, a=a: a[rows][index]) for a in (x, y)]

  rng = np.random.default_rng(args.seed)
  epoch_losses = []
  start = time.perf_counter()
  for epoch in range(1, args.epochs + 1):
    order = rng.permutation(len(x))
    losses = []
    for i in range(steps_per_epoch):
      xb, yb = global_batch(order[i * args.batch_size:(i + 1) * args.batch_size])
      params, rngs, opt_state, loss = train_step(params, rngs, opt_state,
                                                 xb, yb)
      losses.append(loss)
    epoch_losses.append(float(np.mean([local(l) for l in losses])))
    if jax.process_index() == 0:
      print(f"Epoch {epoch}, Loss: {epoch_losses[-1]:.4f}", flush=True)
  seconds = time.perf_counter() - start

  state_bytes = jadam.sharding.bytes_per_device(opt_state)
  results = {
      "num_processes": jax.process_count(),
      "devices": jax.device_count(),
      "zero1": args.zero1,
      "epoch_losses": epoch_losses,
      "params": {"/".join(str(k) for k in path): local(v).tolist()
                 for path, v in jax.tree_util.tree_leaves_with_path(params)},
      "state_bytes_per_device": max(state_bytes.values()),
      "seconds": seconds,
  }
  if args.num_processes > 1:
    jax.distributed.shutdown()
  return results


def jnp_mean_sq(d):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp.mean(d ** 2)


def local(array) -> np.ndarray:
  """This process's copy of a replicated global array."""
  return np.asarray(array.addressable_data(0))


def launch(args) -> list[dict]:
  """Run ``args.num_processes`` copies of this script here; their results."""
  coordinator = args.coordinator or f"127.0.0.1:{free_port()}"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  # One CPU device per process: a forced device count would multiply it.
  env.pop("XLA_FLAGS", None)
  with tempfile.TemporaryDirectory() as tmp:
    outs = [os.path.join(tmp, f"process{i}.json")
            for i in range(args.num_processes)]
    procs = []
    for i, out in enumerate(outs):
      cmd = [sys.executable, os.path.abspath(__file__),
             "--num-processes", str(args.num_processes), "--process-id", str(i),
             "--coordinator", coordinator, "--epochs", str(args.epochs),
             "--batch-size", str(args.batch_size),
             "--learning-rate", str(args.learning_rate),
             "--seed", str(args.seed), "--samples", str(args.samples),
             "--out", out]
      if args.zero1:
        cmd.append("--zero1")
      procs.append(subprocess.Popen(cmd, env=env))
    deadline = time.monotonic() + args.timeout
    codes = []
    try:
      for proc in procs:
        codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
    finally:
      for proc in procs:
        if proc.poll() is None:
          proc.kill()
          proc.wait()
    if any(codes):
      raise RuntimeError(f"process exit codes {codes}")
    results = []
    for out in outs:
      with open(out) as f:
        results.append(json.load(f))
    return results


def relative_difference(a: dict, b: dict) -> float:
  """‖a − b‖ / ‖b‖ over all parameters."""
  fa = np.concatenate([np.ravel(a[k]) for k in sorted(b)])
  fb = np.concatenate([np.ravel(b[k]) for k in sorted(b)])
  return float(np.linalg.norm(fa - fb) / np.linalg.norm(fb))


def main(argv=None) -> dict:
  args = parse_args(argv)
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  if args.num_processes > 1 and args.process_id is None:
    per_process = launch(args)
    print(f"{args.num_processes} processes done; now one process.", flush=True)
    single = train(argparse.Namespace(**{**vars(args), "num_processes": 1,
                                         "process_id": None}))
    report = {
        "multi": per_process[0],
        "single": single,
        "processes_agree": all(
            relative_difference(r["params"], per_process[0]["params"]) == 0.0
            for r in per_process),
        "relative_difference": relative_difference(
            per_process[0]["params"], single["params"]),
    }
    print(f"processes hold identical parameters: {report['processes_agree']}")
    print("relative difference of parameters, "
          f"{args.num_processes} processes vs one: "
          f"{report['relative_difference']:.2e}")
  else:
    report = train(args)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f)
    print(f"wrote {args.out}", flush=True)
  return report


if __name__ == "__main__":
  main()

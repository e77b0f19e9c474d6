"""What was tried to bring one flat Adam step nearer the bandwidth floor.

An experiment record, kept outside the installed package; run it from a
checkout with jadam installed.

``python benchmarks/kernels.py`` times ``jadam.adam`` on one flat float32
buffer of 16M elements (the ``single_16m`` tree) compiled several ways,
interleaved in one process with the in-place copy that sets the floor:

* ``xla``: the default, as in ``python -m benchmarks.bench``. XLA:CPU emits three
  loops (first moment, second moment, parameter), 40 bytes per parameter.
* ``fast_math``: ``compiler_options={"xla_cpu_enable_fast_math": True}``.
* ``vector_512``: ``compiler_options={"xla_cpu_prefer_vector_width": 512}``.
* ``chunked_<n>`` (``--blocks n``): one pass in blocks of n elements
  (``lax.fori_loop``), each block stepped by the same ``opt.update``, so that
  a block's moments stay in cache between the moment and parameter loops (28
  bytes per parameter in principle). In practice XLA recomputes the update
  inside the in-place parameter write from the old moments, which the
  in-place moment writes have overwritten, so its copy insertion keeps a full
  copy of the moments in every iteration: seconds per step. The loop also
  runs on one thread.
* with ``--multi-output-fusion`` the whole run is repeated in a subprocess
  with ``XLA_FLAGS=--xla_backend_extra_options=xla_cpu_use_multi_output_fusion``
  (process-wide, what :func:`jadam.enable_cpu_fusion` sets). jadam then
  computes the direction from the loaded inputs and XLA merges the parameter
  and both moments into one loop: 28 bytes (see ``jadam._fusion``).

``python benchmarks/kernels.py --train-step jadam,optax`` asks what the
process-wide flag costs outside the optimizer: the benchmark's transformer
LM training step (forward, backward, update) runs in two child processes per
implementation, one with the flag and one without, stepped one at a time in
a new random order every round, and the medians are printed.

The Adam arithmetic is always :func:`jadam.adam`'s; only the compilation and
the walk over the buffer change.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jadam import _alias
from jadam import _fusion

SIZE = 1 << 24


def _step(opt):
  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def _chunked_step(opt, block: int):
  """The optimizer step taken block by block in one pass over the buffer."""
  def step(params, state, grads):
    count = state[0].count
    slice_ = lambda x, start: jax.lax.dynamic_slice(x, (start,), (block,))
    put = lambda x, new, start: jax.lax.dynamic_update_slice(x, new, (start,))

    def body(i, carry):
      params, state = carry
      start = i * block
      sliced = jax.tree.map(
          lambda x: slice_(x, start) if x.ndim else x, state)
      # Each block sees the step count of the whole step.
      sliced = (sliced[0]._replace(count=count),) + tuple(sliced[1:])
      updates, new = opt.update(slice_(grads, start), sliced,
                                slice_(params, start))
      # Materialise the block's results before writing any of them back, so
      # that XLA does not recompute them from moments already overwritten
      # (which would make it keep a full copy of the old moments).
      new_params, new = jax.lax.optimization_barrier(
          (slice_(params, start) + updates, new))
      state = jax.tree.map(
          lambda x, y: put(x, y, start) if x.ndim else y, state, new)
      return put(params, new_params, start), state

    return jax.lax.fori_loop(0, SIZE // block, body, (params, state))
  return step


def _variants(blocks):
  plain = lambda opt: _step(opt)
  variants = {"xla": (plain, None),
              "fast_math": (plain, {"xla_cpu_enable_fast_math": True}),
              "vector_512": (plain, {"xla_cpu_prefer_vector_width": 512})}
  for block in blocks:
    variants[f"chunked_{block // 1024}k"] = (
        lambda opt, block=block: _chunked_step(opt, block), None)
  return variants


def measure(steps: int, blocks) -> dict[str, float]:
  """Median ms per variant, plus the floor (28 B/param over copy bandwidth)."""
  grads = jnp.asarray(
      1e-3 * np.random.default_rng(1).standard_normal(SIZE, np.float32))
  runners = {}
  for name, (make, options) in _variants(blocks).items():
    opt = _alias.adam(1e-3)
    params = jnp.ones(SIZE)
    state = opt.init(params)
    lowered = jax.jit(make(opt), donate_argnums=(0, 1)).lower(
        params, state, grads)
    compiled = lowered.compile(options) if options else lowered.compile()
    runners[name] = [compiled, params, state, []]
  copy = [jax.jit(jnp.negative, donate_argnums=0), jnp.ones(SIZE), []]
  finals = {}
  for i in range(steps + 3):
    for name, runner in runners.items():
      start = time.perf_counter()
      runner[1], runner[2] = runner[0](runner[1], runner[2], grads)
      jax.block_until_ready(runner[1:3])
      if i >= 3:
        runner[3].append(time.perf_counter() - start)
    start = time.perf_counter()
    copy[1] = copy[0](copy[1])
    copy[1].block_until_ready()
    if i >= 3:
      copy[2].append(time.perf_counter() - start)
  for name, runner in runners.items():
    finals[name] = np.asarray(runner[1])
  reference = finals["xla"]
  for name, final in finals.items():
    difference = float(np.max(np.abs(final - reference)))
    if difference > 1e-6:
      raise AssertionError(f"{name} differs from xla by {difference}")
  result = {name: 1e3 * statistics.median(r[3]) for name, r in runners.items()}
  bandwidth = 8 * SIZE / statistics.median(copy[2])
  result["floor"] = 1e3 * 28 * SIZE / bandwidth
  return result


def _train_child(impl: str, fused: bool) -> None:
  """Serve one training step per line on stdin; print its seconds."""
  if __package__ in (None, ""):
    # Run as a script: the clone's root is where ``benchmarks`` lives.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
        __file__))))
  from benchmarks import bench  # pylint: disable=import-outside-toplevel
  if fused:
    _fusion.enable_cpu_fusion()
  runner = bench.TRAIN_IMPLS[impl](False)
  for _ in range(3):
    runner.step()
  print("ready", flush=True)
  for _ in sys.stdin:
    start = time.perf_counter()
    runner.step()
    print(time.perf_counter() - start, flush=True)


def compare_train_flags(impls, rounds: int) -> dict[tuple[str, bool], float]:
  """Median ms of the LM training step per (implementation, flag on)."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(
      f for f in env.get("XLA_FLAGS", "").split() if _fusion.OPTION not in f)
  children = {}
  for impl in impls:
    for fused in (True, False):
      child = subprocess.Popen(
          [sys.executable, os.path.abspath(__file__), "--serve-train",
           f"{impl},{int(fused)}"], stdin=subprocess.PIPE,
          stdout=subprocess.PIPE, text=True, env=env)
      if child.stdout.readline().strip() != "ready":
        raise RuntimeError(f"the {impl} child did not start")
      children[(impl, fused)] = child
  times = {key: [] for key in children}
  rng = np.random.default_rng(0)
  keys = list(children)
  for _ in range(rounds):
    for i in rng.permutation(len(keys)):
      child = children[keys[i]]
      child.stdin.write("step\n")
      child.stdin.flush()
      times[keys[i]].append(float(child.stdout.readline()))
  for child in children.values():
    child.stdin.close()
    child.wait()
  return {key: 1e3 * statistics.median(t) for key, t in times.items()}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=15)
  parser.add_argument("--blocks", default="",
                      help="block sizes of chunked variants to add, e.g. "
                      "262144 (slow: see the module docstring)")
  parser.add_argument("--multi-output-fusion", action="store_true",
                      help="repeat in a subprocess with XLA's CPU "
                      "multi-output fusion enabled")
  parser.add_argument("--train-step", metavar="IMPLS", default="",
                      help="instead: the LM training step of these "
                      "implementations (e.g. jadam,optax) with and without "
                      "the flag, in child processes")
  parser.add_argument("--rounds", type=int, default=16,
                      help="timed steps per child with --train-step")
  parser.add_argument("--serve-train", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.serve_train:
    impl, fused = args.serve_train.split(",")
    _train_child(impl, bool(int(fused)))
    return 0
  if args.train_step:
    impls = [i for i in args.train_step.split(",") if i]
    result = compare_train_flags(impls, args.rounds)
    print("LM training step, median ms (multi-output fusion on / off):")
    for impl in impls:
      on, off = result[(impl, True)], result[(impl, False)]
      print(f"  {impl:8s} {on:8.1f} / {off:8.1f}  on/off {on / off:.3f}")
    return 0
  blocks = [int(b) for b in args.blocks.split(",") if b]
  result = measure(args.steps, blocks)
  floor = result.pop("floor")
  label = ("multi-output fusion" if _fusion.OPTION
           in os.environ.get("XLA_FLAGS", "") else "default flags")
  print(f"single_16m, {label}: floor {floor:.2f} ms")
  for name, ms in result.items():
    print(f"  {name:14s} {ms:7.2f} ms  {ms / floor:.2f}x floor")
  if args.multi_output_fusion:
    env = dict(os.environ)
    env["XLA_FLAGS"] = _fusion._with_option(env.get("XLA_FLAGS", ""))
    subprocess.run([sys.executable, os.path.abspath(__file__), "--steps",
                    str(args.steps), "--blocks", args.blocks], env=env,
                   check=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

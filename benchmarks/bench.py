"""``python -m benchmarks.bench`` (from a clone's root, or
``python benchmarks/bench.py``): Adam step time against optax and PyTorch.

All implementations run in one process and are interleaved step by step, so
that a load change on the machine hits them alike. Each implementation is
compiled, warmed up, then timed for ``--steps`` steps with its parameters and
state donated (updated in place); the table gives medians.

Columns:

* ``step ms``: median wall time of one optimizer step (update and apply).
* ``compile s``: trace and XLA compile time of that step (``-`` for torch).
* ``state B/param``: bytes of optimizer state per parameter, summed from the
  real state arrays.
* ``floor ms``: 28 bytes per float32 parameter (read θ, g, m, v; write θ, m,
  v) over the memory bandwidth of an in-place elementwise pass over an
  array much larger than the last-level cache (64 MiB on a CPU, 1 GiB on an
  accelerator, whose L2 can be 60 MB; ``--probe-mib`` sets it), measured
  interleaved with the steps of the same tree.

Trees: ``--size default`` (CPU-sized: up to 16.8M parameters) or ``--size
large`` (accelerator-sized: a 1.1B-parameter Llama-shaped tree, GPT-2 small,
1000 leaves of 65,536 and one leaf of 2^28); ``--trees`` picks any of them.
The machine, device and versions head the table and the plot and are in the
JSON; every row that cannot run here is skipped with the reason. Rows that
do not fit in memory together run in consecutive groups (:func:`run`).

Compiler flags: the run turns on XLA:CPU's multi-output fusion for the
whole process (:func:`jadam.enable_cpu_fusion`, what jadam recommends for
float32 training on CPU), so every implementation, optax included, is
compiled with it. ``--default-xla-flags`` leaves XLA's defaults.

Implementations are entries of :data:`IMPLS`, a dict from name to a factory
taking the tree's leaf shapes; a new row is one more entry, for example::

    IMPLS["jadam_bf16"] = jax_impl(
        lambda: jadam.adam(1e-3, mu_dtype="bfloat16"), flat=True)
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

if __package__ in (None, ""):
  # Run as a script (python benchmarks/bench.py): the clone's root is where
  # the ``benchmarks`` package lives.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))

from benchmarks import _bench_lm  # pylint: disable=wrong-import-position
from jadam import _alias  # pylint: disable=wrong-import-position
from jadam import _flat  # pylint: disable=wrong-import-position
from jadam import _fusion
from jadam import _health
from jadam.sharding import _offload

Shapes = Mapping[str, tuple[int, ...]]
LEARNING_RATE = 1e-3
FLOOR_BYTES_PER_PARAM = 28


# --------------------------------------------------------------------------
# Trees: leaf name -> shape. ``quick`` gives small versions for smoke tests.

def _gpt_like(quick: bool) -> dict[str, tuple[int, ...]]:
  if quick:
    return _bench_lm.gpt_like_shapes(vocab=512, width=32, depth=2, hidden=64)
  return _bench_lm.gpt_like_shapes()


def _llama_1b(quick: bool) -> dict[str, tuple[int, ...]]:
  """TinyLlama-1.1B's shapes: 22 blocks of width 2048 (grouped-query
  attention with 4 key-value heads of 64, SwiGLU MLP of 5632), vocabulary
  32,000, untied output head: 201 leaves, 1.10B parameters."""
  vocab, width, depth, hidden, kv = ((512, 64, 2, 176, 16) if quick
                                     else (32000, 2048, 22, 5632, 256))
  shapes = {"embed": (vocab, width), "head": (width, vocab),
            "final_norm": (width,)}
  for i in range(depth):
    shapes.update({
        f"b{i:02d}_attn_norm": (width,), f"b{i:02d}_q": (width, width),
        f"b{i:02d}_k": (width, kv), f"b{i:02d}_v": (width, kv),
        f"b{i:02d}_o": (width, width), f"b{i:02d}_mlp_norm": (width,),
        f"b{i:02d}_gate": (width, hidden), f"b{i:02d}_up": (width, hidden),
        f"b{i:02d}_down": (hidden, width)})
  return shapes


def _gpt2_small(quick: bool) -> dict[str, tuple[int, ...]]:
  """GPT-2 small's shapes: 12 blocks of width 768, vocabulary 50,257,
  context 1024, biases and LayerNorms included: 148 leaves, 124M
  parameters."""
  vocab, context, width, depth = ((512, 64, 32, 2) if quick
                                  else (50257, 1024, 768, 12))
  shapes = {"wte": (vocab, width), "wpe": (context, width),
            "ln_f_scale": (width,), "ln_f_bias": (width,)}
  for i in range(depth):
    shapes.update({
        f"h{i:02d}_ln_1_scale": (width,), f"h{i:02d}_ln_1_bias": (width,),
        f"h{i:02d}_attn_w": (width, 3 * width),
        f"h{i:02d}_attn_b": (3 * width,),
        f"h{i:02d}_proj_w": (width, width), f"h{i:02d}_proj_b": (width,),
        f"h{i:02d}_ln_2_scale": (width,), f"h{i:02d}_ln_2_bias": (width,),
        f"h{i:02d}_fc_w": (width, 4 * width), f"h{i:02d}_fc_b": (4 * width,),
        f"h{i:02d}_out_w": (4 * width, width),
        f"h{i:02d}_out_b": (width,)})
  return shapes


TREES: dict[str, Callable[[bool], Shapes]] = {
    "single_16m": lambda quick: {"w": ((1 << 14) if quick else (1 << 24),)},
    "blocks_256x64k": lambda quick: {
        f"w{i:03d}": (16, 16) if quick else (256, 256)
        for i in range(16 if quick else 256)},
    "many_2000x8k": lambda quick: {
        f"w{i:04d}": (64,) if quick else (8192,)
        for i in range(100 if quick else 2000)},
    "gpt_like": _gpt_like,
    # Accelerator-sized (--size large).
    "llama_1b": _llama_1b,
    "gpt2_small": _gpt2_small,
    "many_1000x64k": lambda quick: {
        f"w{i:04d}": (256,) if quick else (1 << 16,)
        for i in range(100 if quick else 1000)},
    "single_256m": lambda quick: {"w": ((1 << 16) if quick else (1 << 28),)},
}

# --size: which trees run by default.
SIZES = {
    "default": ["single_16m", "blocks_256x64k", "many_2000x8k", "gpt_like"],
    "large": ["llama_1b", "gpt2_small", "many_1000x64k", "single_256m"],
}

# The end-to-end row: a full training step of the LM with gpt_like shapes.
TRAIN_TREE = "gpt_like_train"


# --------------------------------------------------------------------------
# Implementations.

class Runner:
  """One implementation set up on one tree, ready to be stepped.

  Attributes:
    compile_s: seconds spent tracing and compiling, or None (no compiler).
    state_bytes: bytes held by the optimizer state.
    num_params: number of parameters.
  """

  compile_s: Optional[float] = None
  state_bytes: int = 0
  num_params: int = 0

  def step(self) -> None:
    """Take one step and wait for it to finish."""
    raise NotImplementedError


def _random_tree(shapes: Shapes, seed: int, scale: float) -> dict[str, Any]:
  rng = np.random.default_rng(seed)
  return {name: (scale * rng.standard_normal(shape, np.float32)).astype(
      np.float32) for name, shape in shapes.items()}


def _tree_data(shapes: Shapes) -> tuple[dict[str, Any], dict[str, Any]]:
  """Parameters and gradients, the same numbers for every implementation.

  Drawn once per tree and shared by its rows (drawing the 2.2 billion
  numbers of ``llama_1b`` takes longer than timing a row), so a row must
  copy them before it writes to them.
  """
  return _cached_tree_data(tuple(shapes.items()))


@functools.lru_cache(maxsize=1)
def _cached_tree_data(items: tuple[tuple[str, tuple[int, ...]], ...]):
  shapes = dict(items)
  return _random_tree(shapes, 0, 1.0), _random_tree(shapes, 1, 1e-3)


def _optimizer_step(opt: optax.GradientTransformation):
  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


class JaxRunner(Runner):
  """A jitted ``update`` + ``apply_updates`` (or ``make_step(opt)``) with
  params and state donated."""

  def __init__(self, opt: optax.GradientTransformation, shapes: Shapes,
               flat: bool,
               make_step: Optional[Callable[[Any], Callable]] = None):
    params, grads = _tree_data(shapes)
    if flat:
      view = _flat.FlatView(params)
      # Packed on the host, so that every implementation's buffers are made
      # the same way (a host-to-device copy of NumPy arrays).
      params, grads = (jax.tree.map(np.asarray, view.ravel(params)),
                       jax.tree.map(np.asarray, view.ravel(grads)))
    self._params = jax.device_put(params)
    self._grads = jax.device_put(grads)
    self._state = opt.init(self._params)
    start = time.perf_counter()
    self._step = jax.jit((make_step or _optimizer_step)(opt),
                         donate_argnums=(0, 1)).lower(
        self._params, self._state, self._grads).compile()
    self.compile_s = time.perf_counter() - start
    self.state_bytes = sum(x.nbytes for x in jax.tree.leaves(self._state))
    self.num_params = sum(x.size for x in jax.tree.leaves(self._params))

  def step(self) -> None:
    self._params, self._state = self._step(self._params, self._state,
                                           self._grads)
    jax.block_until_ready((self._params, self._state))


class jax_impl:  # pylint: disable=invalid-name
  """A factory of :class:`JaxRunner` for the optimizer ``make_opt()``.

  Args:
    make_opt: builds the optimizer (called once per tree).
    flat: run on :class:`jadam.FlatView` buffers (the fast path) rather
      than on the tree.
  """

  def __init__(self, make_opt: Callable[[], optax.GradientTransformation], *,
               flat: bool):
    self.make_opt, self.flat = make_opt, flat

  def __call__(self, shapes: Shapes) -> Runner:
    return JaxRunner(self.make_opt(), shapes, self.flat)

  def resident_bytes(self, shapes: Shapes) -> int:
    """Parameters, gradients and optimizer state, from shapes alone."""
    params = ({"flat": jax.ShapeDtypeStruct((_num_params(shapes),),
                                            jnp.float32)} if self.flat else
              {name: jax.ShapeDtypeStruct(shape, jnp.float32)
               for name, shape in shapes.items()})
    state = jax.eval_shape(self.make_opt().init, params)
    return 2 * _num_params(shapes) * 4 + sum(
        leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))


def _torch_device() -> str:
  """Where the PyTorch rows run: the GPU when JAX runs on one and torch has
  CUDA, else the CPU, so that both libraries are measured on one device."""
  import torch  # pylint: disable=import-outside-toplevel
  if jax.default_backend() == "gpu" and torch.cuda.is_available():
    return "cuda"
  return "cpu"


@functools.lru_cache(maxsize=None)
def _torch_adam_kind() -> Optional[str]:
  """"fused" if torch's fused Adam runs on :func:`_torch_device`, else
  "foreach"; None without torch."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  device = _torch_device()
  param = torch.nn.Parameter(torch.zeros(4, device=device))
  param.grad = torch.ones(4, device=device)
  try:
    torch.optim.Adam([param], lr=LEARNING_RATE, fused=True).step()
    return "fused"
  except (RuntimeError, ValueError, TypeError):
    return "foreach"


class TorchRunner(Runner):
  """A PyTorch optimizer on the same tensors, on :func:`_torch_device`:
  ``torch.optim.Adam`` (fused kernel if available) or, with ``make_opt``,
  another one (bitsandbytes' ``Adam8bit``)."""

  def __init__(self, shapes: Shapes, kind: Optional[str] = None,
               make_opt: Optional[Callable[[list], Any]] = None):
    import torch  # pylint: disable=import-outside-toplevel
    params, grads = _tree_data(shapes)
    self._device = _torch_device()
    self._params = []
    for name in params:
      # A copy: the NumPy arrays are shared with the other rows.
      tensor = torch.nn.Parameter(
          torch.tensor(params[name], device=self._device))
      tensor.grad = torch.tensor(grads[name], device=self._device)
      self._params.append(tensor)
    if make_opt is None:
      self._opt = torch.optim.Adam(self._params, lr=LEARNING_RATE,
                                   **{kind: True})
    else:
      self._opt = make_opt(self._params)
    self.step()  # creates the state, as the first step does
    self.state_bytes = sum(
        value.nbytes for state in self._opt.state.values()
        for value in state.values() if torch.is_tensor(value))
    self.num_params = sum(p.numel() for p in self._params)

  def step(self) -> None:
    self._opt.step()
    if self._device == "cuda":
      import torch  # pylint: disable=import-outside-toplevel
      torch.cuda.synchronize()


def _bnb_available() -> bool:
  """bitsandbytes' 8-bit Adam runs on CUDA tensors only."""
  if not (_importable("bitsandbytes") and _importable("torch")):
    return False
  return _torch_device() == "cuda"


def _bnb_factory(shapes: Shapes) -> Runner:
  import bitsandbytes  # pylint: disable=import-outside-toplevel
  return TorchRunner(shapes, make_opt=lambda params: bitsandbytes.optim.Adam8bit(
      params, lr=LEARNING_RATE))


# Parameters, gradients and two moments of one byte each (plus block scales).
_bnb_factory.resident_bytes = lambda shapes: 10 * _num_params(shapes)


def _torch_factory(shapes: Shapes) -> Runner:
  kind = _torch_adam_kind()
  return TorchRunner(shapes, kind)


def _torch_foreach_factory(shapes: Shapes) -> Runner:
  return TorchRunner(shapes, "foreach")


def _adam_storing(fmt: str) -> Callable[[], optax.GradientTransformation]:
  """``jadam.adam`` with both moments stored as ``fmt``."""
  return lambda: _alias.adam(LEARNING_RATE, mu_dtype=fmt, nu_dtype=fmt)


IMPLS: dict[str, Callable[[Shapes], Runner]] = {
    # The recommended configuration: the flat fast path.
    "jadam": jax_impl(lambda: _alias.adam(LEARNING_RATE), flat=True),
    "jadam_tree": jax_impl(lambda: _alias.adam(LEARNING_RATE), flat=False),
    "optax": jax_impl(lambda: optax.adam(LEARNING_RATE), flat=False),
    "torch_fused": _torch_factory,
    "torch_foreach": _torch_foreach_factory,
    # bitsandbytes' block-wise 8-bit Adam (CUDA only), beside jadam_int8.
    "bnb_adam8bit": _bnb_factory,
    # Lean moment storage on the recommended configuration (docs/memory.md).
    "jadam_bf16": jax_impl(_adam_storing("bfloat16"), flat=True),
    "jadam_int8": jax_impl(_adam_storing("int8"), flat=True),
    # Overhead of the health wrappers around the recommended configuration.
    "jadam_skip_nonfinite": jax_impl(lambda: _health.skip_nonfinite(
        _alias.adam(LEARNING_RATE)), flat=True),
    "jadam_telemetry": jax_impl(lambda: _health.with_telemetry(
        _alias.adam(LEARNING_RATE)), flat=True),
    # Narrow moments on the tree path (compile time grows with the leaves).
    "jadam_tree_bf16": jax_impl(_adam_storing("bfloat16"), flat=False),
    "jadam_tree_int8": jax_impl(_adam_storing("int8"), flat=False),
    # State in host memory between steps (docs/memory.md).
    "jadam_offload": jax_impl(lambda: _offload.offload(
        _alias.adam(LEARNING_RATE)), flat=True),
    "jadam_int8_offload": jax_impl(
        lambda: _offload.offload(_adam_storing("int8")()), flat=True),
}

# Rows that need something optional: name -> "is it available?".
def _offload_works() -> bool:
  try:
    _offload._check_compiled_transfers()  # pylint: disable=protected-access
  except NotImplementedError:
    return False
  return True


OPTIONAL: dict[str, Callable[[], bool]] = {
    "torch_fused": lambda: _torch_adam_kind() is not None,
    "torch_foreach": lambda: _torch_adam_kind() is not None,
    "bnb_adam8bit": _bnb_available,
    "jadam_offload": _offload_works,
    "jadam_int8_offload": _offload_works,
}


def default_probe_bytes() -> int:
  """Size of the bandwidth probe: far beyond the last-level cache (64 MiB
  on a CPU; 1 GiB on an accelerator: an H200's L2 alone is 60 MB)."""
  return (64 << 20) if jax.default_backend() == "cpu" else (1 << 30)


class _CopyBandwidth(Runner):
  """An in-place elementwise pass over ``num_bytes``: bytes moved per
  second."""

  def __init__(self, num_bytes: int = 64 << 20):
    self._x = jnp.ones(num_bytes // 4, jnp.float32)
    self._negate = jax.jit(jnp.negative, donate_argnums=0).lower(
        self._x).compile()
    self.bytes_moved = 2 * num_bytes  # read once, write once

  def step(self) -> None:
    self._x = self._negate(self._x)
    self._x.block_until_ready()


# --------------------------------------------------------------------------
# End-to-end: a full training step of the small transformer LM.

class TrainRunner(Runner):
  """Forward, backward and update of the gpt_like LM (seq 128, batch 8)."""

  def __init__(self, make_opt: Callable[[], optax.GradientTransformation],
               flat: bool, quick: bool):
    size = (dict(vocab=512, width=32, depth=2, hidden=64, seq=16, batch=2)
            if quick else {})
    params, loss_fn, self._tokens = _bench_lm.lm_problem(**size)
    opt = make_opt()
    if flat:
      view = _flat.FlatView(params)
      params = view.ravel(params)
      tree_loss = loss_fn
      loss_fn = lambda flat, tokens: tree_loss(view.unravel(flat), tokens)

    def train_step(params, state, tokens):
      grads = jax.grad(loss_fn)(params, tokens)
      updates, state = opt.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    self._params = params
    self._state = opt.init(params)
    start = time.perf_counter()
    self._step = jax.jit(train_step, donate_argnums=(0, 1)).lower(
        self._params, self._state, self._tokens).compile()
    self.compile_s = time.perf_counter() - start
    self.state_bytes = sum(x.nbytes for x in jax.tree.leaves(self._state))
    self.num_params = sum(x.size for x in jax.tree.leaves(self._params))

  def step(self) -> None:
    self._params, self._state = self._step(self._params, self._state,
                                           self._tokens)
    jax.block_until_ready((self._params, self._state))


TRAIN_IMPLS: dict[str, Callable[[bool], Runner]] = {
    "jadam": lambda quick: TrainRunner(
        lambda: _alias.adam(LEARNING_RATE), flat=True, quick=quick),
    "jadam_tree": lambda quick: TrainRunner(
        lambda: _alias.adam(LEARNING_RATE), flat=False, quick=quick),
    "optax": lambda quick: TrainRunner(
        lambda: optax.adam(LEARNING_RATE), flat=False, quick=quick),
    "jadam_skip_nonfinite": lambda quick: TrainRunner(
        lambda: _health.skip_nonfinite(_alias.adam(LEARNING_RATE)), flat=True,
        quick=quick),
    "jadam_telemetry": lambda quick: TrainRunner(
        lambda: _health.with_telemetry(_alias.adam(LEARNING_RATE)), flat=True,
        quick=quick),
}


# --------------------------------------------------------------------------
# Timing.

def _interleave(runners: Mapping[str, Runner], steps: int,
                warmup: int) -> dict[str, float]:
  """Median step seconds of each runner, stepping them in turn."""
  for runner in runners.values():
    for _ in range(warmup):
      runner.step()
  times: dict[str, list[float]] = {name: [] for name in runners}
  rng = np.random.default_rng(0)
  for _ in range(steps):
    # A new order every round: a step run right after another one (the
    # 64 MiB copy above all) pays for the write-backs that one left behind,
    # so no runner may always follow the same one.
    for name in rng.permutation(list(runners)):
      start = time.perf_counter()
      runners[name].step()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def _num_params(shapes: Shapes) -> int:
  return sum(int(np.prod(shape)) for shape in shapes.values())


# Host memory the benchmark itself holds per parameter while a tree runs:
# the drawn parameters and gradients (8 bytes), and a flat row's packed copy
# of them with its intermediate (16). On a CPU it is the rows' memory too.
HOST_BYTES_PER_PARAM = 24


def _device_memory_is_the_hosts() -> bool:
  """A CPU: JAX reports no memory limit of its own for the device."""
  return "bytes_limit" not in (jax.devices()[0].memory_stats() or {})


def memory_limit() -> int:
  """Bytes the benchmark may fill: what JAX may still allocate on its
  device (an accelerator's ``bytes_limit``), or the host's available memory
  on a CPU (``MemAvailable``)."""
  if not _device_memory_is_the_hosts():
    stats = jax.devices()[0].memory_stats()
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) << 10
  except OSError:
    pass
  return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def row_bytes(impl: str, shapes: Shapes) -> int:
  """Memory one row may hold while it is timed: twice its parameters,
  gradients and optimizer state (from shapes, without allocating), which
  leaves room for the step's temporaries and the buffers of compilation.
  Factories without a ``resident_bytes`` method count float32 Adam's 16
  bytes per parameter."""
  factory = IMPLS[impl]
  resident = getattr(factory, "resident_bytes", None)
  return 2 * (resident(shapes) if resident is not None
              else 16 * _num_params(shapes))


def plan_groups(sizes: Mapping[str, int], limit: int
                ) -> tuple[list[list[str]], dict[str, int]]:
  """Rows that are timed together (interleaved), in order.

  Args:
    sizes: row name -> :func:`row_bytes`, in the order the rows run.
    limit: the memory the rows may fill (:func:`memory_limit`, less the
      probe and, on a CPU, the benchmark's own copies of the data).

  Returns:
    The groups, each filled in order up to ``limit``, and the rows that do
    not fit even alone (name -> bytes).
  """
  groups, too_big, used = [], {}, 0
  for name, size in sizes.items():
    if size > limit:
      too_big[name] = size
    elif not groups or used + size > limit:
      groups.append([name])
      used = size
    else:
      groups[-1].append(name)
      used += size
  return groups, too_big


def _release() -> None:
  """Frees the rows just timed, PyTorch's cached CUDA blocks included, so
  that the next group has the memory."""
  gc.collect()
  if "torch" in sys.modules:
    import torch  # pylint: disable=import-outside-toplevel
    if torch.cuda.is_available():
      torch.cuda.empty_cache()


def run(trees: Sequence[str], impls: Sequence[str], steps: int = 15,
        warmup: int = 3, quick: bool = False,
        log: Callable[[str], None] = print,
        probe_bytes: Optional[int] = None,
        memory_bytes: Optional[int] = None) -> dict[str, Any]:
  """Run the benchmark; returns the ``--json`` document.

  The rows of a tree are interleaved step by step. Where they do not all
  fit in memory at once (the ``--size large`` trees: about 35 GB per row of
  ``llama_1b`` by :func:`row_bytes`), they run in consecutive groups that
  do, each interleaved with its own bandwidth probe; the tree's floor is
  the median of those probes. A row that does not fit even alone is
  skipped with its size.

  Args:
    trees: names from :data:`TREES`, and/or ``"gpt_like_train"``.
    impls: names from :data:`IMPLS` (unavailable optional ones are skipped).
    steps: timed steps per implementation (medians are reported).
    warmup: untimed steps per implementation first.
    quick: small trees, for a smoke test; timings mean little.
    log: progress messages.
    probe_bytes: size of the bandwidth probe (default
      :func:`default_probe_bytes`).
    memory_bytes: memory the rows may fill (default :func:`memory_limit`,
      read when a tree starts, less the benchmark's own host copies of the
      tree's data where the device's memory is the host's).

  Returns:
    ``{"results": [{"tree", "impl", "step_ms", "compile_s",
    "state_bytes_per_param"}], "floor_ms": {tree: ms}, "groups": {tree:
    [[impl, ...], ...]}}`` plus ``"machine"``, ``"skipped"`` (name or
    ``"impl on tree"`` -> reason) and ``"interrupted"``: whether a
    ``KeyboardInterrupt`` (Ctrl-C, or a time limit's SIGINT) ended the run
    early, in which case the rows measured until then are returned.
  """
  results, floor_ms, skipped, groups_of = [], {}, {}, {}
  if probe_bytes is None:
    probe_bytes = (1 << 20) if quick else default_probe_bytes()
  available = [name for name in impls
               if name not in OPTIONAL or OPTIONAL[name]()]
  for name in impls:
    if name not in available:
      skipped[name] = _why_unavailable(name)
      log(f"skipping {name}: {skipped[name]}")
  if TRAIN_TREE in trees and not _importable("flax"):
    # The training-step row builds a Flax model; say so before any work.
    skipped[TRAIN_TREE] = ("it needs Flax, which is not installed "
                           "(pip install 'jadam[examples]')")
    log(f"skipping {TRAIN_TREE}: {skipped[TRAIN_TREE]}")
    trees = [t for t in trees if t != TRAIN_TREE]
  if "torch_fused" in available and _torch_adam_kind() != "fused":
    log("torch has no fused Adam on this CPU: torch_fused uses foreach=True")

  def record(tree, runners, medians):
    for name, runner in runners.items():
      results.append({
          "tree": tree,
          "impl": name,
          "step_ms": 1e3 * medians[name],
          "compile_s": runner.compile_s,
          "state_bytes_per_param": runner.state_bytes / runner.num_params,
      })
      log(f"{tree}: {name} {1e3 * medians[name]:.2f} ms")

  interrupted = False
  try:
    for tree in trees:
      if tree == TRAIN_TREE:
        runners = {name: factory(quick)
                   for name, factory in TRAIN_IMPLS.items() if name in impls}
        record(tree, runners, _interleave(runners, steps, warmup))
        del runners
        _release()
        continue
      shapes = TREES[tree](quick)
      limit = (memory_limit() if memory_bytes is None else memory_bytes)
      host = (HOST_BYTES_PER_PARAM * _num_params(shapes)
              if memory_bytes is None and _device_memory_is_the_hosts()
              else 0)
      groups, too_big = plan_groups(
          {name: row_bytes(name, shapes) for name in available},
          limit - host - probe_bytes)
      for name, size in too_big.items():
        skipped[f"{name} on {tree}"] = (
            f"needs about {size / 1e9:.1f} GB, and {limit / 1e9:.1f} GB are "
            "free here" + (f", {host / 1e9:.1f} GB of them for the "
                           "benchmark's own copies of the data"
                           if host else ""))
        log(f"skipping {name} on {tree}: {skipped[f'{name} on {tree}']}")
      bandwidths = []
      for group in groups:
        runners = {}
        for name in group:
          log(f"{tree}: setting up {name}")
          runners[name] = IMPLS[name](shapes)
        copy = _CopyBandwidth(probe_bytes)
        medians = _interleave({**runners, "_copy": copy}, steps, warmup)
        bandwidths.append(copy.bytes_moved / medians.pop("_copy"))
        log(f"{tree}: {bandwidths[-1] / 1e9:.1f} GB/s in-place copy "
            "bandwidth")
        record(tree, runners, medians)
        groups_of.setdefault(tree, []).append(group)
        floor_ms[tree] = (1e3 * FLOOR_BYTES_PER_PARAM * _num_params(shapes)
                          / statistics.median(bandwidths))
        del runners, copy
        _release()
      _cached_tree_data.cache_clear()
  except KeyboardInterrupt:
    # A long run stopped by hand (or by a time limit's SIGINT) still
    # reports the rows it measured.
    interrupted = True
    log("interrupted: reporting the rows measured so far")
  machine = _machine()
  machine["probe_bytes"] = probe_bytes
  return {"results": results, "floor_ms": floor_ms, "groups": groups_of,
          "machine": machine, "skipped": skipped, "interrupted": interrupted}


def _why_unavailable(name: str) -> str:
  """Why an optional row cannot run on this machine."""
  if name.startswith("torch"):
    return "PyTorch is not installed (pip install 'jadam[bench]')"
  if name == "bnb_adam8bit":
    if not _importable("bitsandbytes"):
      return "bitsandbytes is not installed"
    if not _importable("torch"):
      return "bitsandbytes needs PyTorch, which is not installed"
    return "bitsandbytes' 8-bit Adam runs on CUDA only, and JAX is not on a GPU"
  if name in ("jadam_offload", "jadam_int8_offload"):
    return ("this JAX cannot move arrays between memory kinds inside a "
            "compiled step on this backend")
  return "not available here"


def _importable(module: str) -> bool:
  import importlib.util  # pylint: disable=import-outside-toplevel
  return importlib.util.find_spec(module) is not None


def _machine() -> dict[str, Any]:
  device = jax.devices()[0]
  info = {"platform": platform.platform(), "python": platform.python_version(),
          "processor": platform.processor() or platform.machine(),
          "jax": jax.__version__, "jaxlib": _version("jaxlib"),
          "optax": optax.__version__,
          "backend": jax.default_backend(),
          "device_kind": device.device_kind,
          "devices": [str(d) for d in jax.devices()],
          "cpu_count": os.cpu_count(),
          "xla_cpu_multi_output_fusion": _fusion.cpu_fusion_active(),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}
  try:
    import torch  # pylint: disable=import-outside-toplevel
    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    info["torch_device"] = _torch_device()
    if info["torch_device"] == "cuda":
      info["torch_cuda"] = torch.version.cuda
      info["torch_gpu"] = torch.cuda.get_device_name()
  except ImportError:
    pass
  if _importable("bitsandbytes"):
    info["bitsandbytes"] = _version("bitsandbytes")
  try:
    info["loadavg"] = os.getloadavg()
  except OSError:
    pass
  return info


def _version(package: str) -> Optional[str]:
  import importlib.metadata  # pylint: disable=import-outside-toplevel
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def describe_machine(machine: Mapping[str, Any]) -> str:
  """One line: device, backend and versions, for the table and the plot."""
  parts = [f"{machine.get('device_kind', '?')} ({machine.get('backend', '?')}"
           f", {len(machine.get('devices', []))} device(s))",
           f"{machine.get('cpu_count')} CPU cores",
           f"Python {machine.get('python')}",
           f"jax {machine.get('jax')}", f"optax {machine.get('optax')}"]
  if "torch" in machine:
    torch = f"torch {machine['torch']} on {machine.get('torch_device')}"
    if machine.get("torch_gpu"):
      torch += f" ({machine['torch_gpu']}, CUDA {machine.get('torch_cuda')})"
    parts.append(torch)
  if machine.get("bitsandbytes"):
    parts.append(f"bitsandbytes {machine['bitsandbytes']}")
  if "probe_bytes" in machine:
    parts.append(f"bandwidth probe {machine['probe_bytes'] >> 20} MiB")
  return ", ".join(parts)


def format_table(doc: Mapping[str, Any]) -> str:
  """The results as a Markdown table, with ratios to optax and torch."""
  by_key = {(r["tree"], r["impl"]): r for r in doc["results"]}
  lines = ["| tree | impl | step ms | compile s | state B/param | floor ms |"
           " × floor | × optax | × torch_fused |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for r in doc["results"]:
    floor = doc["floor_ms"].get(r["tree"])
    bases = [floor] + [by_key[(r["tree"], impl)]["step_ms"]
                       if (r["tree"], impl) in by_key else None
                       for impl in ("optax", "torch_fused")]
    ratios = ["" if base is None else f"{r['step_ms'] / base:.2f}"
              for base in bases]
    compile_s = ("-" if r["compile_s"] is None else f"{r['compile_s']:.2f}")
    lines.append(
        f"| {r['tree']} | {r['impl']} | {r['step_ms']:.2f} | {compile_s} | "
        f"{r['state_bytes_per_param']:.2f} | "
        f"{'' if floor is None else f'{floor:.2f}'} | " + " | ".join(ratios)
        + " |")
  return "\n".join(lines)


def plot(doc: Mapping[str, Any], path: str) -> None:
  """A bar chart of step time per tree per implementation (matplotlib)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  trees = list(dict.fromkeys(r["tree"] for r in doc["results"]))
  impls = list(dict.fromkeys(r["impl"] for r in doc["results"]))
  by_key = {(r["tree"], r["impl"]): r["step_ms"] for r in doc["results"]}
  width = 0.8 / len(impls)
  # 20 distinct colours: the default cycle has 10, and a full run has more
  # implementations than that.
  colors = plt.get_cmap("tab20").colors
  fig, ax = plt.subplots(figsize=(2.2 * len(trees) + 4, 4))
  for i, impl in enumerate(impls):
    xs = [t + (i - (len(impls) - 1) / 2) * width for t in range(len(trees))]
    ys = [by_key.get((tree, impl), 0.0) for tree in trees]
    ax.bar(xs, ys, width, label=impl, color=colors[i % len(colors)])
  for t, tree in enumerate(trees):
    if tree in doc["floor_ms"]:
      ax.hlines(doc["floor_ms"][tree], t - 0.4, t + 0.4, colors="k",
                linestyles="dashed", label="bandwidth floor" if t == 0 else None)
  ax.set_xticks(range(len(trees)), trees)
  ax.set_ylabel("median step time (ms)")
  ax.set_yscale("log")
  ax.set_title("Adam step, params and state donated\n"
               + describe_machine(doc.get("machine", {})), fontsize=8)
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Command-line entry point (``python -m benchmarks.bench``)."""
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", choices=sorted(SIZES), default="default",
                      help="which trees run when --trees is not given: "
                      "default (CPU-sized, with the LM training step) or "
                      "large (accelerator-sized: "
                      + ", ".join(SIZES["large"]) + ")")
  parser.add_argument("--trees", default=None,
                      help="comma-separated, from: "
                      + ", ".join([*TREES, TRAIN_TREE]))
  parser.add_argument("--probe-mib", type=int, default=None,
                      help="size of the bandwidth probe in MiB (default: "
                      "64 on a CPU, 1024 on an accelerator)")
  parser.add_argument("--impls", default=",".join(IMPLS),
                      help="comma-separated, from: " + ", ".join(IMPLS))
  parser.add_argument("--steps", type=int, default=15,
                      help="timed steps per implementation (default 15)")
  parser.add_argument("--warmup", type=int, default=3,
                      help="untimed steps first (default 3)")
  parser.add_argument("--quick", action="store_true",
                      help="tiny trees: a smoke test, not a measurement")
  parser.add_argument("--memory-gib", type=float, default=None,
                      help="memory the rows of one tree may fill at once "
                      "(default: what is free on the device, or on the "
                      "host for a CPU); rows that do not fit together run "
                      "in groups")
  parser.add_argument("--json", metavar="PATH", help="write results here")
  parser.add_argument("--plot", metavar="PATH", help="write a bar chart PNG")
  parser.add_argument("--default-xla-flags", action="store_true",
                      help="leave XLA:CPU multi-output fusion off (by "
                      "default the run turns it on for every implementation, "
                      "as jadam.enable_cpu_fusion() recommends)")
  args = parser.parse_args(argv)
  # On a GPU JAX would otherwise take 75% of the memory when it starts,
  # leaving the PyTorch rows too little for the large trees; it has to be
  # set before JAX's first computation.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if not args.default_xla_flags:
    _fusion.enable_cpu_fusion()
  if args.trees is None:
    args.trees = ",".join(SIZES[args.size]
                          + ([TRAIN_TREE] if args.size == "default" else []))
  trees = [t for t in args.trees.split(",") if t]
  impls = [i for i in args.impls.split(",") if i]
  for tree in trees:
    if tree not in TREES and tree != TRAIN_TREE:
      parser.error(f"unknown tree {tree!r}")
  for impl in impls:
    if impl not in IMPLS:
      parser.error(f"unknown implementation {impl!r}")
  if args.steps < 1 or args.warmup < 0:
    parser.error("--steps must be >= 1 and --warmup >= 0")
  log = lambda message: print(message, file=sys.stderr, flush=True)
  if args.probe_mib is not None and args.probe_mib < 1:
    parser.error("--probe-mib must be >= 1")
  if args.memory_gib is not None and args.memory_gib <= 0:
    parser.error("--memory-gib must be > 0")
  doc = run(trees, impls, steps=args.steps, warmup=args.warmup,
            quick=args.quick, log=log,
            probe_bytes=None if args.probe_mib is None
            else args.probe_mib << 20,
            memory_bytes=None if args.memory_gib is None
            else int(args.memory_gib * (1 << 30)))
  print("Machine: " + describe_machine(doc["machine"]))
  for name, why in doc["skipped"].items():
    print(f"Skipped {name}: {why}")
  for tree, groups in doc["groups"].items():
    if len(groups) > 1:
      print(f"{tree}: rows timed in {len(groups)} groups (by memory): "
            + "; ".join(", ".join(group) for group in groups))
  if doc["interrupted"]:
    print("Interrupted: only the rows measured before it are below")
  print(format_table(doc))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(doc, f, indent=1)
  if args.plot and doc["results"]:
    plot(doc, args.plot)
  return 130 if doc["interrupted"] else 0


if __name__ == "__main__":
  sys.exit(main())

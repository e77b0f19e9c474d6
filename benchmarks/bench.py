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
  real state arrays; ``*`` marks a row of narrow moments some of whose
  leaves keep them in float32 (under int8's ``min_size``), with a note.
* ``floor ms``: 28 bytes per float32 parameter (read θ, g, m, v; write θ, m,
  v) over the memory bandwidth of an in-place elementwise pass over an
  array much larger than the last-level cache (64 MiB on a CPU, 1 GiB on an
  accelerator, whose L2 can be 60 MB; ``--probe-mib`` sets it), measured
  interleaved with the steps of the same tree.

Trees: ``--size default`` (CPU-sized: up to 16.8M parameters) or ``--size
large`` (accelerator-sized: a 1.1B-parameter Llama-shaped tree, GPT-2 small,
1000 leaves of 65,536 and one leaf of 2^28); ``--trees`` picks any of them.
``--quick`` runs small versions of them, named by their own size
(``single_16k`` for ``single_16m``), as a smoke test. The machine, device
and versions head the table and the plot and are in the JSON.

Memory: before anything runs, the benchmark prints its plan (:func:`plan`):
the budget, half of the host's available memory on a CPU (all of an
accelerator's free memory; ``--memory-gib`` sets it), each row's estimated
bytes (its data twice, plus what compiling its step takes), the groups of
rows that fit together (run one group after another) and every row that
will not run, with the reason.

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
import ctypes
import functools
import gc
import json
import os
import platform
import statistics
import sys
import textwrap
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
import jadam  # pylint: disable=wrong-import-position
from jadam import _alias  # pylint: disable=wrong-import-position
from jadam import _flat  # pylint: disable=wrong-import-position
from jadam import _fusion
from jadam import _health
from jadam.sharding import _offload

Shapes = Mapping[str, tuple[int, ...]]
LEARNING_RATE = 1e-3
FLOOR_BYTES_PER_PARAM = 28


# --------------------------------------------------------------------------
# Trees: leaf name -> shape. ``quick`` gives small versions for smoke tests,
# named after their own size (:data:`QUICK_NAMES`). Their leaves are large
# enough (4096 elements or more, rows of 256 where the full tree has them)
# for int8 moments to apply where they apply at full size.

# The quick gpt_like LM (its training row too): one block of width 256.
QUICK_LM = dict(vocab=512, width=256, depth=1, hidden=1024)


def _gpt_like(quick: bool) -> dict[str, tuple[int, ...]]:
  if quick:
    return _bench_lm.gpt_like_shapes(**QUICK_LM)
  return _bench_lm.gpt_like_shapes()


def _llama_1b(quick: bool) -> dict[str, tuple[int, ...]]:
  """TinyLlama-1.1B's shapes: 22 blocks of width 2048 (grouped-query
  attention with 4 key-value heads of 64, SwiGLU MLP of 5632), vocabulary
  32,000, untied output head: 201 leaves, 1.10B parameters."""
  vocab, width, depth, hidden, kv = ((512, 64, 2, 176, 64) if quick
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
  vocab, context, width, depth = ((512, 64, 64, 2) if quick
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
        f"w{i:03d}": (16, 256) if quick else (256, 256)
        for i in range(16 if quick else 256)},
    "many_2000x8k": lambda quick: {
        f"w{i:04d}": (4096,) if quick else (8192,)
        for i in range(32 if quick else 2000)},
    "gpt_like": _gpt_like,
    # Accelerator-sized (--size large).
    "llama_1b": _llama_1b,
    "gpt2_small": _gpt2_small,
    "many_1000x64k": lambda quick: {
        f"w{i:04d}": (4096,) if quick else (1 << 16,)
        for i in range(16 if quick else 1000)},
    "single_256m": lambda quick: {"w": ((1 << 16) if quick else (1 << 28),)},
}

# What each tree is called with --quick: its own size, never the full one
# (k = 1024 elements in the synthetic trees; the LMs give their parameter
# count).
QUICK_NAMES = {
    "single_16m": "single_16k",
    "blocks_256x64k": "blocks_16x4k",
    "many_2000x8k": "many_32x4k",
    "gpt_like": "gpt_like_921k",
    "llama_1b": "llama_166k",
    "gpt2_small": "gpt2_137k",
    "many_1000x64k": "many_16x4k",
    "single_256m": "single_64k",
}

# --size: which trees run by default.
SIZES = {
    "default": ["single_16m", "blocks_256x64k", "many_2000x8k", "gpt_like"],
    "large": ["llama_1b", "gpt2_small", "many_1000x64k", "single_256m"],
}

# The end-to-end row: a full training step of the LM with gpt_like shapes.
TRAIN_TREE = "gpt_like_train"


def tree_label(tree: str, quick: bool) -> str:
  """The name a tree's rows carry: ``tree``, or with ``quick`` the name of
  the small version that runs (``single_16m`` -> ``single_16k``)."""
  if not quick:
    return tree
  if tree == TRAIN_TREE:
    return QUICK_NAMES["gpt_like"] + "_train"
  return QUICK_NAMES[tree]


# --------------------------------------------------------------------------
# Implementations.

class Runner:
  """One implementation set up on one tree, ready to be stepped.

  Attributes:
    compile_s: seconds spent tracing and compiling, or None (no compiler).
    state_bytes: bytes held by the optimizer state.
    num_params: number of parameters.
    float32_moments: ``(leaves, parameters)`` whose moments stay float32
      although the row stores them narrower (int8's ``min_size``).
  """

  compile_s: Optional[float] = None
  state_bytes: int = 0
  num_params: int = 0
  float32_moments: tuple[int, int] = (0, 0)

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
  params and state donated; ``moments`` names the storage the optimizer
  asks for (``"int8"``, ``"bfloat16"``), to count the leaves that keep
  float32 moments instead."""

  def __init__(self, opt: optax.GradientTransformation, shapes: Shapes,
               flat: bool,
               make_step: Optional[Callable[[Any], Callable]] = None,
               moments: Optional[str] = None):
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
    if moments is not None:
      self.float32_moments = _float32_moments(self._state, moments)

  def step(self) -> None:
    self._params, self._state = self._step(self._params, self._state,
                                           self._grads)
    jax.block_until_ready((self._params, self._state))


def _float32_moments(state: Any, moments: str) -> tuple[int, int]:
  """Leaves and parameters of ``state`` (per :func:`jadam.describe`) whose
  moments are not stored as ``moments`` asks: float32, for leaves under
  int8's ``min_size``."""
  kept = [leaf for leaf in jadam.describe(state).leaves
          if not all(fmt.startswith(moments)
                     for fmt in leaf.formats.values())]
  return len(kept), sum(int(np.prod(leaf.shape)) for leaf in kept)


# Host memory XLA:CPU takes to compile one step (and, for part of it, to
# keep the compiled program), in bytes times leaves**1.5: it grows faster
# than the number of leaves the step walks, and not with their size.
# Measured as the rise of the peak resident memory while one row is set
# up, on N leaves of 8192 float32 (jax 0.10.2, CPU): int8 moments on the
# tree 0.41, 0.97, 2.64 and 7.8 GB at N = 125, 250, 500 and 1000 (about
# 22 GB at 2000, which filled a 24 GiB machine); bfloat16 moments 0.44 and
# 1.37 GB at 500 and 1000; float32 (jadam's tree path or optax) 0.40 GB at
# 1000. A flat row compiles one buffer per dtype: one leaf.
COMPILE_BYTES_PER_LEAF_POW = {"int8": 250e3, "bfloat16": 45e3, None: 13e3}


class jax_impl:  # pylint: disable=invalid-name
  """A factory of :class:`JaxRunner` for the optimizer ``make_opt()``.

  Args:
    make_opt: builds the optimizer (called once per tree).
    flat: run on :class:`jadam.FlatView` buffers (the fast path) rather
      than on the tree.
    moments: the storage of both moments, when not float32 (``"int8"``,
      ``"bfloat16"``): rows then report the leaves that keep float32.
  """

  def __init__(self, make_opt: Callable[[], optax.GradientTransformation], *,
               flat: bool, moments: Optional[str] = None):
    self.make_opt, self.flat, self.moments = make_opt, flat, moments

  def __call__(self, shapes: Shapes) -> Runner:
    return JaxRunner(self.make_opt(), shapes, self.flat,
                     moments=self.moments)

  def compile_bytes(self, shapes: Shapes) -> int:
    """Host memory to compile the step (:data:`COMPILE_BYTES_PER_LEAF_POW`).
    """
    leaves = 1 if self.flat else len(shapes)
    return int(COMPILE_BYTES_PER_LEAF_POW[self.moments] * leaves ** 1.5)

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
  return TorchRunner(shapes, make_opt=lambda params: (
      bitsandbytes.optim.Adam8bit(params, lr=LEARNING_RATE)))


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


def _storing(fmt: str, *, flat: bool) -> jax_impl:
  return jax_impl(_adam_storing(fmt), flat=flat, moments=fmt)


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
    "jadam_bf16": _storing("bfloat16", flat=True),
    "jadam_int8": _storing("int8", flat=True),
    # Overhead of the health wrappers around the recommended configuration.
    "jadam_skip_nonfinite": jax_impl(lambda: _health.skip_nonfinite(
        _alias.adam(LEARNING_RATE)), flat=True),
    "jadam_telemetry": jax_impl(lambda: _health.with_telemetry(
        _alias.adam(LEARNING_RATE)), flat=True),
    # Narrow moments on the tree path (compile time grows with the leaves).
    "jadam_tree_bf16": _storing("bfloat16", flat=False),
    "jadam_tree_int8": _storing("int8", flat=False),
    # State in host memory between steps (docs/memory.md).
    "jadam_offload": jax_impl(lambda: _offload.offload(
        _alias.adam(LEARNING_RATE)), flat=True),
    "jadam_int8_offload": jax_impl(
        lambda: _offload.offload(_adam_storing("int8")()), flat=True,
        moments="int8"),
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
    size = dict(QUICK_LM, seq=16, batch=2) if quick else {}
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

# The share of the host's available memory (MemAvailable) a run plans to
# fill: the machine may be shared with other work, and the row sizes are
# estimates. An accelerator's free memory is planned in full: nothing else
# shares the device, and every row already counts its data twice.
HOST_MEMORY_FRACTION = 0.5


def _device_memory_is_the_hosts() -> bool:
  """A CPU: JAX reports no memory limit of its own for the device."""
  return "bytes_limit" not in (jax.devices()[0].memory_stats() or {})


def memory_limit() -> int:
  """Bytes available now: what JAX may still allocate on its device (an
  accelerator's ``bytes_limit`` less what is in use), or the host's
  available memory on a CPU (``MemAvailable``: free memory and the caches
  the kernel can drop, not the installed memory)."""
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
  """Memory one row may hold while it is set up and timed: twice its
  parameters, gradients and optimizer state (from shapes, without
  allocating), which leaves room for the step's temporaries, plus what
  compiling its step takes (``compile_bytes``: gigabytes for narrow
  moments on a tree of thousands of leaves). Factories without a
  ``resident_bytes`` method count float32 Adam's 16 bytes per parameter."""
  factory = IMPLS[impl]
  resident = getattr(factory, "resident_bytes", None)
  compile_bytes = getattr(factory, "compile_bytes", None)
  return (2 * (resident(shapes) if resident is not None
               else 16 * _num_params(shapes))
          + (compile_bytes(shapes) if compile_bytes is not None else 0))


def plan_groups(sizes: Mapping[str, int], limit: int
                ) -> tuple[list[list[str]], dict[str, int]]:
  """Rows that are timed together (interleaved), in order.

  Args:
    sizes: row name -> :func:`row_bytes`, in the order the rows run.
    limit: the memory the rows may fill (the budget of :func:`plan`, less
      the probe and, on a CPU, the benchmark's own copies of the data).

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


def plan(trees: Sequence[str], impls: Sequence[str], quick: bool,
         probe_bytes: int, memory_bytes: Optional[int] = None
         ) -> dict[str, Any]:
  """Which rows run together, from shapes alone, before anything runs.

  The budget is ``memory_bytes`` where given (``--memory-gib``), else
  :data:`HOST_MEMORY_FRACTION` of the host's available memory on a CPU,
  or all of an accelerator's free memory (:func:`memory_limit`, read
  once). Each tree's rows (:func:`row_bytes`) fill that budget less the
  bandwidth probe and, on a CPU, the benchmark's own copies of the data
  (:data:`HOST_BYTES_PER_PARAM`), in groups (:func:`plan_groups`); a row
  that does not fit even alone is skipped with the reason.

  Args:
    trees: names from :data:`TREES`, and/or ``"gpt_like_train"``.
    impls: the rows that can run here, in order.
    quick: the small trees.
    probe_bytes: size of the bandwidth probe.
    memory_bytes: the budget, or None for the rule above.

  Returns:
    ``{"available_bytes", "source", "fraction", "budget_bytes",
    "probe_bytes", "trees": {label: {"tree", "params", "leaves",
    "host_bytes", "rows": {impl: bytes}, "compile_bytes": {impl: bytes},
    "groups": [[impl, ...], ...], "skipped": {impl: reason}}}}`` (rows
    by :func:`row_bytes`, of which ``compile_bytes``);
    ``available_bytes`` is None with ``memory_bytes``.
  """
  on_host = _device_memory_is_the_hosts()
  if memory_bytes is None:
    available = memory_limit()
    fraction = HOST_MEMORY_FRACTION if on_host else 1.0
    source = ("the host's MemAvailable" if on_host
              else "free on the device")
    budget = int(fraction * available)
  else:
    available, fraction, source = None, 1.0, "--memory-gib"
    budget = memory_bytes
  doc = {"available_bytes": available, "source": source,
         "fraction": fraction, "budget_bytes": budget,
         "probe_bytes": probe_bytes, "trees": {}}
  for tree in trees:
    train = tree == TRAIN_TREE
    shapes = TREES["gpt_like" if train else tree](quick)
    params = _num_params(shapes)
    # A training row is sized as its optimizer's row on the same tree;
    # it draws no data of the benchmark's and has no probe.
    host = (HOST_BYTES_PER_PARAM * params
            if memory_bytes is None and on_host and not train else 0)
    overhead = host + (0 if train else probe_bytes)
    names = [name for name in impls if not train or name in TRAIN_IMPLS]
    rows = {name: row_bytes(name, shapes) for name in names}
    compiling = {name: getattr(IMPLS[name], "compile_bytes",
                               lambda _: 0)(shapes) for name in names}
    groups, too_big = plan_groups(rows, budget - overhead)
    skipped = {}
    for name, size in too_big.items():
      why = f"needs about {_size(size)}"
      if compiling[name] > size / 2:
        why += (f" ({_size(compiling[name])} of it to compile a step over "
                f"{len(shapes)} leaves)")
      why += (f", more than the {_size(max(budget - overhead, 0))} the "
              f"budget of {_size(budget)} leaves for rows")
      if host:
        why += (f" beside the benchmark's own copies of the data "
                f"({_size(host)})")
      skipped[name] = why
    doc["trees"][tree_label(tree, quick)] = {
        "tree": tree, "params": params, "leaves": len(shapes),
        "host_bytes": host, "rows": rows, "compile_bytes": compiling,
        "groups": groups, "skipped": skipped}
  return doc


def _size(num_bytes: float) -> str:
  for unit, scale in (("GB", 1e9), ("MB", 1e6)):
    if num_bytes >= scale:
      return f"{num_bytes / scale:.{1 if unit == 'GB' else 0}f} {unit}"
  return f"{num_bytes / 1e3:.0f} kB"


def _wrap(text: str) -> str:
  return textwrap.fill(text, width=79, subsequent_indent="    ",
                       break_on_hyphens=False)


def format_plan(the_plan: Mapping[str, Any],
                unavailable: Mapping[str, str]) -> str:
  """The plan as text: the budget and where it comes from, each tree's
  rows with their estimated bytes and groups, and every row that will not
  run, with the reason (one line per reason)."""
  budget = the_plan["budget_bytes"]
  if the_plan["available_bytes"] is None:
    lines = [f"Memory plan: a budget of {_size(budget)} (--memory-gib)."]
  else:
    share = {1.0: "all", 0.5: "half"}.get(the_plan["fraction"],
                                          f"{the_plan['fraction']:g}")
    lines = [_wrap(f"Memory plan: {_size(the_plan['available_bytes'])} "
                   f"available ({the_plan['source']}); the budget is {share} "
                   f"of it, {_size(budget)} (--memory-gib sets it).")]
  for label, entry in the_plan["trees"].items():
    leaves = entry["leaves"]
    text = (f"{label}: {entry['params']:,} parameters in {leaves} "
            + ("leaf" if leaves == 1 else "leaves"))
    overhead = entry["host_bytes"]
    if entry["host_bytes"]:
      text += f"; the benchmark's own copies {_size(entry['host_bytes'])}"
    if entry["tree"] != TRAIN_TREE:
      overhead += the_plan["probe_bytes"]
      text += f"; probe {_size(the_plan['probe_bytes'])}"
    running = [f"{name} {_size(size)}" for name, size in entry["rows"].items()
               if name not in entry["skipped"]]
    if running:
      text += "; rows: " + ", ".join(running)
    lines.append(_wrap(text))
    groups = entry["groups"]
    if len(groups) > 1:
      lines.append(_wrap(f"  in {len(groups)} groups: "
                         + "; ".join(", ".join(group) for group in groups)))
    if entry["skipped"]:
      left = budget - overhead
      why = (f"needing more than the {_size(left)} the budget leaves for "
             "rows" if left > 0 else "the data's copies and the probe alone "
             "exceed the budget")
      sizes = []
      for name in entry["skipped"]:
        size, compiling = entry["rows"][name], entry["compile_bytes"][name]
        sizes.append(f"{name} {_size(size)}" + (
            f" ({_size(compiling)} of it to compile)"
            if compiling > size / 2 else ""))
      lines.append(_wrap(f"  skipped, {why}: " + ", ".join(sizes)))
  by_reason: dict[str, list[str]] = {}
  for name, why in unavailable.items():
    by_reason.setdefault(why, []).append(name)
  for why, names in by_reason.items():
    lines.append(_wrap(f"Skipped {', '.join(names)}: {why}"))
  return "\n".join(lines)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Optional[Callable[[int], int]]:
  """glibc's ``malloc_trim``, or None elsewhere."""
  try:
    return ctypes.CDLL("libc.so.6").malloc_trim
  except (OSError, AttributeError):
    return None


def _release() -> None:
  """Frees what the rows just set up or timed no longer hold, and hands it
  back to the system: glibc keeps memory that XLA's compiler freed (1.8 of
  the 2.9 GB resident after compiling a step over 500 leaves with int8
  moments) until it is trimmed, and on a shared machine that is memory
  taken from other work. PyTorch's cached CUDA blocks are freed too."""
  gc.collect()
  trim = _malloc_trim()
  if trim is not None:
    trim(0)
  if "torch" in sys.modules:
    import torch  # pylint: disable=import-outside-toplevel
    if torch.cuda.is_available():
      torch.cuda.empty_cache()


def run(trees: Sequence[str], impls: Sequence[str], steps: int = 15,
        warmup: int = 3, quick: bool = False,
        log: Callable[[str], None] = print,
        probe_bytes: Optional[int] = None,
        memory_bytes: Optional[int] = None,
        show: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
  """Run the benchmark; returns the ``--json`` document.

  Before anything runs, :func:`plan` sizes every row from shapes and
  ``show`` prints the plan (:func:`format_plan`). The rows of a tree are
  interleaved step by step. Where they do not all fit in the budget at
  once (the ``--size large`` trees: about 35 GB per row of ``llama_1b``
  by :func:`row_bytes`), they run in consecutive groups that do, each
  interleaved with its own bandwidth probe; the tree's floor is the median
  of those probes. A row that does not fit even alone is skipped with its
  size.

  Args:
    trees: names from :data:`TREES`, and/or ``"gpt_like_train"``.
    impls: names from :data:`IMPLS` (unavailable optional ones are skipped).
    steps: timed steps per implementation (medians are reported).
    warmup: untimed steps per implementation first.
    quick: small trees, for a smoke test; timings mean little. Rows are
      labelled with the small trees' names (:func:`tree_label`).
    log: progress messages.
    probe_bytes: size of the bandwidth probe (default
      :func:`default_probe_bytes`).
    memory_bytes: the memory budget (default: see :func:`plan`).
    show: where the plan goes (default ``log``).

  Returns:
    ``{"results": [{"tree", "impl", "step_ms", "compile_s",
    "state_bytes_per_param", "params", "float32_moment_leaves",
    "float32_moment_params"}], "floor_ms": {tree: ms}, "groups": {tree:
    [[impl, ...], ...]}}`` plus ``"quick"``, ``"plan"`` (:func:`plan`),
    ``"machine"``, ``"skipped"`` (name or ``"impl on tree"`` -> reason) and
    ``"interrupted"``: whether a ``KeyboardInterrupt`` (Ctrl-C, or a time
    limit's SIGINT) ended the run early, in which case the rows measured
    until then are returned. Trees are named by :func:`tree_label`.
  """
  show = log if show is None else show
  results, floor_ms, skipped, groups_of = [], {}, {}, {}
  if probe_bytes is None:
    probe_bytes = (1 << 20) if quick else default_probe_bytes()
  available = [name for name in impls
               if name not in OPTIONAL or OPTIONAL[name]()]
  for name in impls:
    if name not in available:
      skipped[name] = _why_unavailable(name)
  if TRAIN_TREE in trees and not _importable("flax"):
    # The training-step row builds a Flax model; say so before any work.
    skipped[tree_label(TRAIN_TREE, quick)] = (
        "it needs Flax, which is not installed (pip install "
        "'jadam[examples]')")
    trees = [t for t in trees if t != TRAIN_TREE]
  unavailable = dict(skipped)
  the_plan = plan(trees, available, quick, probe_bytes, memory_bytes)
  for label, entry in the_plan["trees"].items():
    for name, why in entry["skipped"].items():
      skipped[f"{name} on {label}"] = why
  text = format_plan(the_plan, unavailable)
  if "torch_fused" in available and _torch_adam_kind() != "fused":
    text += ("\ntorch has no fused Adam on this CPU: torch_fused uses "
             "foreach=True")
  show(text)

  def record(tree, runners, medians):
    for name, runner in runners.items():
      leaves, params = runner.float32_moments
      results.append({
          "tree": tree,
          "impl": name,
          "step_ms": 1e3 * medians[name],
          "compile_s": runner.compile_s,
          "state_bytes_per_param": runner.state_bytes / runner.num_params,
          "params": runner.num_params,
          "float32_moment_leaves": leaves,
          "float32_moment_params": params,
      })
      log(f"{tree}: {name} {1e3 * medians[name]:.2f} ms")

  interrupted = False
  try:
    for tree in trees:
      label = tree_label(tree, quick)
      shapes = None if tree == TRAIN_TREE else TREES[tree](quick)
      bandwidths = []
      for group in the_plan["trees"][label]["groups"]:
        runners = {}
        for name in group:
          log(f"{label}: setting up {name}")
          runners[name] = (TRAIN_IMPLS[name](quick) if shapes is None
                           else IMPLS[name](shapes))
          # The compiler's memory goes back before the next row compiles.
          _release()
        if shapes is None:
          record(label, runners, _interleave(runners, steps, warmup))
        else:
          copy = _CopyBandwidth(probe_bytes)
          medians = _interleave({**runners, "_copy": copy}, steps, warmup)
          bandwidths.append(copy.bytes_moved / medians.pop("_copy"))
          log(f"{label}: {bandwidths[-1] / 1e9:.1f} GB/s in-place copy "
              "bandwidth")
          record(label, runners, medians)
          floor_ms[label] = (1e3 * FLOOR_BYTES_PER_PARAM
                             * _num_params(shapes)
                             / statistics.median(bandwidths))
          del copy
        groups_of.setdefault(label, []).append(group)
        del runners
        _release()
      _cached_tree_data.cache_clear()
  except KeyboardInterrupt:
    # A long run stopped by hand (or by a time limit's SIGINT) still
    # reports the rows it measured.
    interrupted = True
    log("interrupted: reporting the rows measured so far")
  machine = _machine()
  machine["probe_bytes"] = probe_bytes
  return {"quick": quick, "results": results, "floor_ms": floor_ms,
          "groups": groups_of, "plan": the_plan, "machine": machine,
          "skipped": skipped, "interrupted": interrupted}


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


QUICK_CAPTION = ("Quick smoke test (--quick): timings of small trees, not "
                 "a measurement.")


def format_table(doc: Mapping[str, Any]) -> str:
  """The results as a Markdown table, with ratios to the floor, optax and
  (where it ran) torch_fused; a caption with ``--quick``, and a note under
  the table for each narrow-moment row with leaves kept in float32."""
  by_key = {(r["tree"], r["impl"]): r for r in doc["results"]}
  bases = ["optax"] + (["torch_fused"] if any(
      r["impl"] == "torch_fused" for r in doc["results"]) else [])
  lines = ["| tree | impl | step ms | compile s | state B/param | floor ms |"
           " × floor | " + " | ".join(f"× {base}" for base in bases) + " |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | "
           + " | ".join("---:" for _ in bases) + " |"]
  notes = []
  for r in doc["results"]:
    floor = doc["floor_ms"].get(r["tree"])
    ratios = ["" if base is None else f"{r['step_ms'] / base:.2f}"
              for base in [floor] + [
                  by_key[(r["tree"], impl)]["step_ms"]
                  if (r["tree"], impl) in by_key else None
                  for impl in bases]]
    compile_s = ("-" if r["compile_s"] is None else f"{r['compile_s']:.2f}")
    per_param = f"{r['state_bytes_per_param']:.2f}"
    if r.get("float32_moment_leaves"):
      per_param += "*"
      notes.append(
          f"* {r['impl']} on {r['tree']}: {r['float32_moment_leaves']} "
          f"leaves ({r['float32_moment_params']:,} of {r['params']:,} "
          "parameters) keep float32 moments, being under int8's min_size "
          f"({jadam.BlockwiseInt8().min_size} elements).")
    lines.append(
        f"| {r['tree']} | {r['impl']} | {r['step_ms']:.2f} | {compile_s} | "
        f"{per_param} | {'' if floor is None else f'{floor:.2f}'} | "
        + " | ".join(ratios) + " |")
  if doc.get("quick"):
    lines = [QUICK_CAPTION, ""] + lines
  return "\n".join(lines + ([""] + notes if notes else []))


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
                linestyles="dashed",
                label="bandwidth floor" if t == 0 else None)
  ax.set_xticks(range(len(trees)), trees)
  ax.set_ylabel("median step time (ms)")
  ax.set_yscale("log")
  ax.set_title(("Quick smoke test: " if doc.get("quick") else "")
               + "Adam step, params and state donated\n"
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
                      help="small trees, named by their own size "
                      "(single_16k, ...): a smoke test, not a measurement")
  parser.add_argument("--memory-gib", type=float, default=None,
                      help="memory budget of the rows of one tree, "
                      "probe and data included (default: half of the "
                      "host's available memory on a CPU, all of an "
                      "accelerator's free memory); rows that do not fit "
                      "together run in groups")
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
  if args.quick:
    print("Quick smoke test (--quick): every tree is a small version,\n"
          "named by its own size (single_16k for single_16m).", flush=True)
  doc = run(trees, impls, steps=args.steps, warmup=args.warmup,
            quick=args.quick, log=log,
            probe_bytes=None if args.probe_mib is None
            else args.probe_mib << 20,
            memory_bytes=None if args.memory_gib is None
            else int(args.memory_gib * (1 << 30)),
            show=lambda text: print(text, flush=True))
  print("Machine: " + describe_machine(doc["machine"]))
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

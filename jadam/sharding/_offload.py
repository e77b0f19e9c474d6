"""Optimizer state kept in host memory between steps (``offload``)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax

from jadam import _compat
from jadam.sharding import _placement

# "pinned_host" is the memory JAX moves to and from inside a compiled function.
MEMORY_KINDS = ("pinned_host",)


def _memory_kinds(device: Any) -> list[str]:
  return _compat.memory_kinds(device)


def _check_backend(memory_kind: str, devices: Any) -> None:
  for device in devices:
    kinds = _memory_kinds(device)
    if memory_kind not in kinds:
      raise ValueError(
          f"jadam.sharding.offload: device {device} ({device.platform}) has no "
          f"memory kind {memory_kind!r}; its memories are {kinds}. "
          f"Offloading needs a backend with host memory spaces (CPU, GPU, "
          f"TPU in current JAX releases); leave the state on the device "
          f"instead.")


@jax.jit
def _to_host(x: jax.Array) -> jax.Array:
  return _compat.transfer(x, host=True)


def _check_compiled_transfers() -> None:
  """Raise where ``jit`` does not move arrays to host memory (JAX 0.8 on CPU
  compiles the transfer away, silently leaving the state on the device)."""
  with jax.ensure_compile_time_eval():
    kind = _to_host(np.zeros((), np.float32)).sharding.memory_kind
  if kind != "pinned_host":
    raise NotImplementedError(
        f"jadam.sharding.offload: JAX {jax.__version__} on {jax.default_backend()} "
        f"does not move arrays to host memory inside jax.jit (a compiled "
        f"transfer to pinned_host returned {kind!r} memory), so the state "
        f"would stay on the device. Use a newer JAX (0.10 works on CPU).")


def _move(tree: Any, memory_kind: str, to_host: bool) -> Any:
  """``tree``'s arrays moved to host (``to_host``) or device memory."""

  def leaf(x):
    if not isinstance(x, jax.Array):
      return x
    if _compat.is_tracer(x):
      # Inside jit: an annotation the compiler turns into a transfer.
      return _compat.transfer(x, host=to_host)
    _check_backend(memory_kind, x.sharding.device_set)
    kind = memory_kind if to_host else "device"
    if x.sharding.memory_kind == kind:
      return x
    return jax.device_put(x, _compat.with_memory_kind(x.sharding, kind))

  return jax.tree.map(leaf, tree)


def offload(tx: optax.GradientTransformation,
            memory_kind: str = "pinned_host"
            ) -> optax.GradientTransformationExtraArgs:
  """Keep ``tx``'s state in host memory between steps.

  ``update`` brings the state to device memory, runs ``tx.update`` and sends
  the new state back, inside the caller's ``jit``; shardings are kept.
  Donate the parameters together with the state (or neither): XLA:CPU
  aborts a step that donates only the offloaded state and returns new
  parameters (docs/memory.md).

  Args:
    tx: any optax transformation (a jadam optimizer, a chain, a wrapper).
    memory_kind: the host memory kind; only ``"pinned_host"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with ``tx``'s state.

  Raises:
    NotImplementedError: where ``jit`` cannot move arrays to host memory
      (JAX 0.8 on CPU).

  Example:
    >>> import jax.numpy as jnp, jadam
    >>> tx = jadam.sharding.offload(jadam.adam(1e-3))
    >>> tx.init({"w": jnp.zeros(8)})[0].mu["w"].sharding.memory_kind
    'pinned_host'
  """
  if memory_kind not in MEMORY_KINDS:
    raise ValueError(
        f"memory_kind must be one of {MEMORY_KINDS} (the host memory JAX "
        f"transfers to and from inside jit), got {memory_kind!r}.")
  tx = optax.with_extra_args_support(tx)

  def init_fn(params):
    _check_compiled_transfers()
    # Place wrappers' loose scalars first, so they land in host memory too.
    state = _placement.place_scalars(tx.init(params), params)
    return _move(state, memory_kind, to_host=True)

  def update_fn(updates, state, params=None, **extra_args):
    _check_compiled_transfers()
    state = _move(state, memory_kind, to_host=False)
    updates, state = tx.update(updates, state, params, **extra_args)
    return updates, _move(state, memory_kind, to_host=True)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def in_memory_of(new: Any, old: Any) -> Any:
  """``new`` in host memory where ``old`` is, for wrappers that select
  between states on the device (``skip_nonfinite``) around ``offload``."""
  if not (isinstance(old, jax.Array) and _compat.in_host_memory(old)):
    return new
  if _compat.is_tracer(new):
    return _compat.transfer(new, host=True)
  return jax.device_put(new, old.sharding)


def on_device(tree: Any) -> Any:
  """``tree``'s host-memory arrays brought to device memory (for
  ``with_telemetry`` on an offloaded state)."""
  return jax.tree.map(
      lambda x: _move(x, x.sharding.memory_kind if not _compat.is_tracer(x)
                      else "pinned_host", to_host=False)
      if isinstance(x, jax.Array) and _compat.in_host_memory(x) else x, tree)

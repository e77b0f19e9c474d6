"""Optimizer state kept in host memory between steps.

Adam's state is twice the parameters in float32. :func:`offload` wraps any
optax transformation so that its state lives in a host memory kind of the
parameters' devices (``"pinned_host"``) with the same sharding: ``init`` puts
it there, and ``update`` brings it to device memory inside the compiled step,
runs the wrapped update, and sends the new state back. The transfers are
ordinary operations of the step, so XLA schedules them around the compute;
between steps no byte of optimizer state occupies device memory.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax

from jadam import _compat
from jadam.sharding import _placement

# The memory kinds a state can be offloaded to. "pinned_host" is the one
# JAX moves to and from inside a compiled function (jax.memory.Space.Host).
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
  """Raise if this JAX does not move arrays to host memory inside ``jit``
  on the default backend (JAX 0.8 on CPU compiles the transfer away and
  returns device arrays, which would leave the state on the device without
  a word). The probe is a scalar function compiled once by JAX."""
  with jax.ensure_compile_time_eval():
    kind = _to_host(np.zeros((), np.float32)).sharding.memory_kind
  if kind != "pinned_host":
    raise NotImplementedError(
        f"jadam.sharding.offload: JAX {jax.__version__} on {jax.default_backend()} "
        f"does not move arrays to host memory inside jax.jit (a compiled "
        f"transfer to pinned_host returned {kind!r} memory), so the state "
        f"would stay on the device. Use a newer JAX (0.10 works on CPU).")


def _move(tree: Any, memory_kind: str, to_host: bool) -> Any:
  """Every array of ``tree`` in host memory (``to_host``) or device memory,
  with its sharding otherwise unchanged."""

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

  ``init`` returns the wrapped state in ``memory_kind`` (eagerly, or under
  ``jax.jit``, where the compiled init writes it there). ``update`` moves the
  state to device memory, runs ``tx.update`` (with every extra argument, so
  :func:`jadam.skip_nonfinite`'s in-pass skip still reaches the moments),
  and moves the new state back, all inside the caller's ``jit``: the
  transfers are part of the compiled step. Shardings are kept, so under
  :func:`jadam.sharding.zero1` each device offloads its own 1/N.

  What crosses the host link per step is the state twice (down and up):
  16 bytes per parameter with float32 moments, 8 with bfloat16 and about
  4 with int8 (see ``docs/memory.md`` for when that pays).

  Args:
    tx: any optax transformation (a jadam optimizer, a chain, a wrapper).
    memory_kind: the host memory kind; ``"pinned_host"``, the one JAX
      transfers to and from inside compiled code.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state has the
    structure of ``tx``'s, every array in ``memory_kind``.

  Raises:
    ValueError: at construction for another memory kind; at ``init`` or
      ``update`` (outside jit) if a device of the state has no such memory.
    NotImplementedError: at ``init`` or ``update`` if the installed JAX
      does not transfer to host memory inside ``jit`` on this backend (JAX
      0.8 on CPU).

  Example:
    >>> import jax, jax.numpy as jnp, jadam
    >>> tx = jadam.sharding.offload(jadam.adam(1e-3, nu_dtype="int8"))
    >>> state = tx.init({"w": jnp.zeros(8)})
    >>> state[0].mu["w"].sharding.memory_kind
    'pinned_host'
  """
  if memory_kind not in MEMORY_KINDS:
    raise ValueError(
        f"memory_kind must be one of {MEMORY_KINDS} (the host memory JAX "
        f"transfers to and from inside jit), got {memory_kind!r}.")
  tx = optax.with_extra_args_support(tx)

  def init_fn(params):
    _check_compiled_transfers()
    # Loose scalars of wrappers inside (optax.MultiSteps's counters) are
    # placed first, so they land in host memory where the step returns them.
    state = _placement.place_scalars(tx.init(params), params)
    return _move(state, memory_kind, to_host=True)

  def update_fn(updates, state, params=None, **extra_args):
    _check_compiled_transfers()
    state = _move(state, memory_kind, to_host=False)
    updates, state = tx.update(updates, state, params, **extra_args)
    return updates, _move(state, memory_kind, to_host=True)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def in_memory_of(new: Any, old: Any) -> Any:
  """``new`` moved to host memory where ``old`` lives there.

  A wrapper that selects between a new and an old state (``skip_nonfinite``)
  computes on the device, so its result would leave host memory: a state
  kept by :func:`offload` inside it would come back in device memory after
  one step, unlike what ``init`` and ``abstract_state`` say, and a restored
  checkpoint's next step would mix the two.
  """
  if not (isinstance(old, jax.Array) and _compat.in_host_memory(old)):
    return new
  if _compat.is_tracer(new):
    return _compat.transfer(new, host=True)
  return jax.device_put(new, old.sharding)


def on_device(tree: Any) -> Any:
  """``tree`` with every array that lives in host memory brought to device
  memory, for a wrapper that computes on a state :func:`offload` keeps on
  the host (``with_telemetry`` decoding the moments)."""
  return jax.tree.map(
      lambda x: _move(x, x.sharding.memory_kind if not _compat.is_tracer(x)
                      else "pinned_host", to_host=False)
      if isinstance(x, jax.Array) and _compat.in_host_memory(x) else x, tree)

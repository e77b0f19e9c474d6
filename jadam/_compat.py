"""Every JAX API jadam uses that has moved, or may move, between releases.

jadam supports JAX 0.8 to the newest release. Twice a new JAX has broken it
by moving an API it imported (0.11 removed ``jax.experimental.shard_alike``;
0.12.1 deprecated ``jax.sharding.SingleDeviceSharding``). Every such API is
reached through this module and nowhere else: each name below tries the
newest spelling first and falls back to the oldest supported one, so the
next deprecation is a change of one line here. Names are looked up when
called, not when jadam is imported, so that a deprecated spelling that is
never needed never warns.

``tests/test_compat.py`` imports jadam and exercises each entry with
deprecation warnings raised as errors, on the lowest and newest JAX in CI.

Covered: sharding types and constructors (``NamedSharding``,
``PartitionSpec``, ``Mesh``, single-device shardings), mesh axis types,
``reshard``/``auto_axes``, ``shard_map``, memory kinds, tracers and abstract
types (``typeof``), and the key-path tree utilities.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

# Stable public spellings on every supported release (0.8 to the newest);
# imported once here so that a rename is one line.
from jax.sharding import Mesh  # noqa: F401  (re-exported)
from jax.sharding import NamedSharding  # noqa: F401
from jax.sharding import PartitionSpec  # noqa: F401
from jax.sharding import AxisType  # noqa: F401


def _find(*spellings: str) -> Any:
  """The first of ``spellings`` (dotted paths below ``jax``) that exists."""
  for spelling in spellings:
    obj: Any = jax
    try:
      for part in spelling.split("."):
        obj = getattr(obj, part)
    except AttributeError:
      continue
    return obj
  raise AttributeError(
      f"none of {spellings} exists in JAX {jax.__version__}; jadam needs "
      "one of them (please report this with your JAX version).")


# ---------------------------------------------------------------------------
# Shardings.


def is_single_device_sharding(sharding: Any) -> bool:
  """Whether ``sharding`` places an array whole on one device."""
  if hasattr(jax.sharding, "is_single_device_sharding"):  # JAX >= 0.12.1
    return bool(jax.sharding.is_single_device_sharding(sharding))
  return isinstance(sharding, jax.sharding.SingleDeviceSharding)


def make_single_device_sharding(device: Any) -> jax.sharding.Sharding:
  """A sharding that puts an array whole on ``device``."""
  if hasattr(jax.sharding, "make_single_device_sharding"):  # JAX >= 0.10
    return jax.sharding.make_single_device_sharding(device)
  return jax.sharding.SingleDeviceSharding(device)


def reshard(x: Any, sharding: Any) -> Any:
  """``jax.sharding.reshard``: change the sharding in ``x``'s type."""
  return _find("sharding.reshard")(x, sharding)


def auto_axes(fun: Callable, *, out_sharding: Any) -> Callable:
  """``jax.sharding.auto_axes``: run ``fun`` with Explicit axes made Auto."""
  return _find("sharding.auto_axes")(fun, out_sharding=out_sharding)


def shard_map(fun: Callable, **kwargs: Any) -> Callable:
  """``jax.shard_map`` (keywords ``mesh``, ``in_specs``, ``out_specs``,
  ...)."""
  return _find("shard_map")(fun, **kwargs)


def is_explicit(axis_type: Any) -> bool:
  """Whether a mesh axis type is ``Explicit`` (sharding in the type)."""
  return axis_type == AxisType.Explicit


def abstract_mesh_axis_names() -> tuple:
  """The axis names of the current abstract mesh (inside ``shard_map``, its
  mesh), in the mesh's order."""
  return tuple(getattr(_find("sharding.get_abstract_mesh")(), "axis_names",
                       ()))


def in_manual_axes() -> bool:
  """Whether the code is being traced inside ``jax.shard_map`` (some axis of
  the current abstract mesh is ``Manual``)."""
  mesh = _find("sharding.get_abstract_mesh")()
  return any(t == AxisType.Manual for t in getattr(mesh, "axis_types", ()))


def varying_axes(x: Any) -> frozenset:
  """The manual mesh axes over which ``x`` differs between devices inside
  ``jax.shard_map`` (its type's ``vma``); empty outside shard_map, for a
  value replicated over every axis, or when shard_map runs with
  ``check_vma=False``, which tracks nothing."""
  aval = typeof(x)
  manual = getattr(aval, "manual_axis_type", None)  # JAX 0.10 and later
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(aval, "vma", None) or ())  # JAX 0.8 and 0.9


def with_memory_kind(sharding: Any, kind: str) -> Any:
  """``sharding`` in the memory ``kind`` (``"device"``, ``"pinned_host"``,
  ...)."""
  return sharding.with_memory_kind(kind)


def memory_space(host: bool) -> Any:
  """The memory space ``jax.device_put`` takes to move an array to host
  (``host``) or device memory inside ``jit`` (``jax.memory.Space``)."""
  space = _find("memory.Space")
  return space.Host if host else space.Device


def transfer(x: Any, host: bool) -> Any:
  """``x`` (a tracer inside ``jit``) moved to host (``host``) or device
  memory. The source memory is named too: differentiating a transfer sends
  the cotangent to the transfer's source, and without one JAX (0.8 to 0.12)
  leaves it in the destination's memory, which ``jax.grad`` then refuses
  (``Expected cotangent type float32[n] but got float32<host>[n]``)."""
  return jax.device_put(x, memory_space(host=host),
                        src=memory_space(host=not host))


def in_host_memory(x: Any) -> bool:
  """Whether ``x`` (an array, or a tracer inside ``jit``) lives in host
  memory."""
  if is_tracer(x):
    space = getattr(typeof(x), "memory_space", None)
    return space is not None and space == memory_space(host=True)
  sharding = getattr(x, "sharding", None)
  return getattr(sharding, "memory_kind", None) in ("pinned_host",
                                                    "unpinned_host")


def memory_kinds(device: Any) -> list[str]:
  """The memory kinds ``device`` addresses (empty if the backend has no
  memories API)."""
  try:
    return [m.kind for m in device.addressable_memories()]
  except (AttributeError, NotImplementedError):
    return []


# ---------------------------------------------------------------------------
# Tracers and abstract values.


def is_tracer(x: Any) -> bool:
  """Whether ``x`` is a tracer (inside ``jit``, ``grad``, ``vmap``, ...)."""
  return isinstance(x, _find("core.Tracer"))


def typeof(x: Any) -> Any:
  """``jax.typeof``: the abstract value of ``x`` (shape, dtype, sharding)."""
  return _find("typeof")(x)


# ---------------------------------------------------------------------------
# Key paths.


def flatten_with_path(tree: Any, is_leaf: Callable | None = None
                      ) -> tuple[list[tuple[Any, Any]], Any]:
  """``(path, leaf)`` pairs of ``tree`` and its treedef."""
  return _find("tree.flatten_with_path", "tree_util.tree_flatten_with_path")(
      tree, is_leaf=is_leaf)


def map_with_path(fun: Callable, tree: Any, *rest: Any,
                  is_leaf: Callable | None = None) -> Any:
  """``jax.tree.map_with_path``."""
  return _find("tree.map_with_path", "tree_util.tree_map_with_path")(
      fun, tree, *rest, is_leaf=is_leaf)


def keystr(path: Any, *, simple: bool = False, separator: str = "") -> str:
  """A key path as text (``['a'][0]``, or ``a/0`` with ``simple=True,
  separator='/'``)."""
  return jax.tree_util.keystr(tuple(path), simple=simple,
                              separator=separator)

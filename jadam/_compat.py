"""Every JAX API jadam uses that has moved, or may move, between releases.

jadam supports JAX 0.8 to 0.12 and reaches these only through here, looked
up when called so that an unneeded deprecated spelling never warns.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

# Stable on 0.8 to 0.12; imported here so that a rename is one line.
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


def is_single_device_sharding(sharding: Any) -> bool:
  """Whether ``sharding`` is on one device; 0.12.1 deprecated the class."""
  if hasattr(jax.sharding, "is_single_device_sharding"):  # JAX >= 0.12.1
    return bool(jax.sharding.is_single_device_sharding(sharding))
  return isinstance(sharding, jax.sharding.SingleDeviceSharding)


def make_single_device_sharding(device: Any) -> jax.sharding.Sharding:
  """A sharding on ``device`` alone; the constructor exists from JAX 0.10."""
  if hasattr(jax.sharding, "make_single_device_sharding"):  # JAX >= 0.10
    return jax.sharding.make_single_device_sharding(device)
  return jax.sharding.SingleDeviceSharding(device)


def reshard(x: Any, sharding: Any) -> Any:
  """``jax.sharding.reshard``, looked up lazily (same on 0.8 to 0.12)."""
  return _find("sharding.reshard")(x, sharding)


def auto_axes(fun: Callable, *, out_sharding: Any) -> Callable:
  """``jax.sharding.auto_axes``, looked up lazily (same on 0.8 to 0.12)."""
  return _find("sharding.auto_axes")(fun, out_sharding=out_sharding)


def shard_map(fun: Callable, **kwargs: Any) -> Callable:
  """``jax.shard_map``, looked up lazily (same on 0.8 to 0.12)."""
  return _find("shard_map")(fun, **kwargs)


def is_explicit(axis_type: Any) -> bool:
  """Whether a mesh axis type is ``Explicit`` (same on 0.8 to 0.12)."""
  return axis_type == AxisType.Explicit


def abstract_mesh_axis_names() -> tuple:
  """Axis names of the current abstract mesh (same on 0.8 to 0.12)."""
  return tuple(getattr(_find("sharding.get_abstract_mesh")(), "axis_names",
                       ()))


def in_manual_axes() -> bool:
  """Whether tracing is inside ``jax.shard_map`` (a ``Manual`` mesh axis)."""
  mesh = _find("sharding.get_abstract_mesh")()
  return any(t == AxisType.Manual for t in getattr(mesh, "axis_types", ()))


def varying_axes(x: Any) -> frozenset:
  """Manual axes ``x`` varies over in ``shard_map``; JAX 0.10 moved ``vma``."""
  aval = typeof(x)
  manual = getattr(aval, "manual_axis_type", None)  # JAX 0.10 and later
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(aval, "vma", None) or ())  # JAX 0.8 and 0.9


def with_memory_kind(sharding: Any, kind: str) -> Any:
  """``sharding`` in memory ``kind`` (same on 0.8 to 0.12)."""
  return sharding.with_memory_kind(kind)


def memory_space(host: bool) -> Any:
  """``jax.memory.Space`` Host or Device, for ``device_put`` inside ``jit``."""
  space = _find("memory.Space")
  return space.Host if host else space.Device


def transfer(x: Any, host: bool) -> Any:
  """``x`` (a tracer inside ``jit``) moved to host or device memory. JAX 0.8
  to 0.12 need the source named, or ``jax.grad`` finds the cotangent in the
  wrong memory (``Expected cotangent type float32[n] but got ...<host>``)."""
  return jax.device_put(x, memory_space(host=host),
                        src=memory_space(host=not host))


def in_host_memory(x: Any) -> bool:
  """Whether an array or tracer ``x`` lives in host memory."""
  if is_tracer(x):
    space = getattr(typeof(x), "memory_space", None)
    return space is not None and space == memory_space(host=True)
  sharding = getattr(x, "sharding", None)
  return getattr(sharding, "memory_kind", None) in ("pinned_host",
                                                    "unpinned_host")


def memory_kinds(device: Any) -> list[str]:
  """Memory kinds of ``device``; empty on backends without that API."""
  try:
    return [m.kind for m in device.addressable_memories()]
  except (AttributeError, NotImplementedError):
    return []


def is_tracer(x: Any) -> bool:
  """Whether ``x`` is a tracer (``jax.core.Tracer``, looked up lazily)."""
  return isinstance(x, _find("core.Tracer"))


def typeof(x: Any) -> Any:
  """``jax.typeof``, looked up lazily (same on 0.8 to 0.12)."""
  return _find("typeof")(x)


def flatten_with_path(tree: Any, is_leaf: Callable | None = None
                      ) -> tuple[list[tuple[Any, Any]], Any]:
  """``(path, leaf)`` pairs and treedef; ``jax.tree_util``'s as fallback."""
  return _find("tree.flatten_with_path", "tree_util.tree_flatten_with_path")(
      tree, is_leaf=is_leaf)


def map_with_path(fun: Callable, tree: Any, *rest: Any,
                  is_leaf: Callable | None = None) -> Any:
  """``jax.tree.map_with_path``; ``jax.tree_util``'s as fallback."""
  return _find("tree.map_with_path", "tree_util.tree_map_with_path")(
      fun, tree, *rest, is_leaf=is_leaf)


def keystr(path: Any, *, simple: bool = False, separator: str = "") -> str:
  """A key path as text (``jax.tree_util.keystr``)."""
  return jax.tree_util.keystr(tuple(path), simple=simple,
                              separator=separator)

"""Flax's metadata boxes (Linen's ``AxisMetadata``, NNX's ``Variable``).

A box is a pytree node holding one array, with axis names as metadata. State
of the parameter's shape keeps its box; int8 block scales, a vector, get one
with names that fit (``box_scales``): a 2-D parameter's names on a 1-D vector
break Flax's partition specs and jit's ``out_shardings``. Flax is never
imported: a box exists only if Flax is loaded, so its classes are looked up
in ``sys.modules``.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Optional

import jax

from jadam import _compat


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AxisNames:
  """jadam's own box: an array with its dimensions' axis names, which
  ``jadam.sharding.state_specs`` follows into the state as Flax's."""

  value: Any
  names: tuple = dataclasses.field(metadata={"static": True})


def _box_types() -> tuple[type, ...]:
  types = [AxisNames]
  meta = sys.modules.get("flax.core.meta")
  if meta is not None and hasattr(meta, "AxisMetadata"):
    types.append(meta.AxisMetadata)
  variables = sys.modules.get("flax.nnx.variablelib")
  if variables is not None and hasattr(variables, "Variable"):
    types.append(variables.Variable)
  return tuple(types)


def is_box(x: Any) -> bool:
  """Whether ``x`` is a box (``AxisNames`` or a Flax one)."""
  return isinstance(x, _box_types())


def open_box(x: Any) -> Any:
  """The array inside a box (``x`` itself if it is not one)."""
  if not is_box(x):
    return x
  leaves = jax.tree.leaves(x)
  if len(leaves) != 1:
    raise TypeError(f"a {type(x).__name__} holding {len(leaves)} arrays "
                    "cannot be a parameter's state; jadam expects one.")
  return leaves[0]


def close_like(box: Any, value: Any) -> Any:
  """``value`` in a box like ``box`` (bare if ``box`` is not a box)."""
  if value is None or not is_box(box):
    return value
  return jax.tree.structure(box).unflatten([value])


def strip(tree: Any) -> Any:
  """``tree`` with every box replaced by the array inside it."""
  return jax.tree.map(open_box, tree, is_leaf=is_box)


def restore(boxed: Any, plain: Any) -> Any:
  """``plain`` (shaped like ``strip(boxed)``) put back into ``boxed``'s boxes:
  trees are matched bare, as the scales' boxes differ from the parameters'."""
  return jax.tree.map(close_like, boxed, plain, is_leaf=is_box)


def _fitted_names(names: Any, keep_leading: bool) -> tuple:
  lead = names[0] if names else None
  return (lead if keep_leading else None,)


def box_scales(box: Any, scales: Optional[Any], keep_leading: bool) -> Any:
  """Block ``scales`` of the parameter in ``box``, in a box of its type.

  The axis names become one: the leading one if ``keep_leading`` (the blocks
  follow the rows), else None. Unknown box types give bare scales; ``scales``
  is None when the moment is not int8.
  """
  if scales is None or not is_box(box):
    return scales
  if hasattr(box, "names") and dataclasses.is_dataclass(box):
    return dataclasses.replace(
        box, value=scales, names=_fitted_names(box.names, keep_leading))
  get_metadata = getattr(box, "get_metadata", None)
  if get_metadata is not None:  # an NNX Variable
    metadata = dict(get_metadata())
    for key in ("out_sharding", "sharding_names", "sharding",
                "optimizer_sharding"):
      if metadata.get(key) is not None:
        metadata[key] = _fitted_names(metadata[key], keep_leading)
    return type(box)(scales, **metadata)
  return scales


def _key_name(key: Any) -> str:
  for attribute in ("key", "idx", "name"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def canonical_path(path: Any) -> str:
  """A key path as groups match it and the doctor names it: dict keys,
  sequence indices and attribute names joined by ``/``, without a trailing
  ``.value`` (Flax boxes and NNX variables)."""
  parts = [_key_name(key) for key in path]
  if parts and parts[-1] == "value" and isinstance(path[-1],
                                                   jax.tree_util.GetAttrKey):
    parts.pop()
  return "/".join(parts)


def leaf_paths(tree: Any) -> list[str]:
  """The canonical path of each leaf of ``tree`` (boxes opened), in order."""
  return [canonical_path(path) for path, _ in
          _compat.flatten_with_path(strip(tree))[0]]

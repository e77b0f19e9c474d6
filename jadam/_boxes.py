"""Flax's metadata boxes, seen through.

Flax wraps parameters in boxes that carry metadata beside the array: Linen's
``flax.core.meta.AxisMetadata`` (``nn.Partitioned``,
``nn.LogicallyPartitioned``: sharding axis names) and NNX's ``nnx.Variable``
(``nnx.Param`` with ``sharding_names`` / ``out_sharding``). Both are pytree
nodes with one child, the array, and the metadata in their auxiliary data, so
``jax.tree.map`` over boxed parameters gives boxed results with the
parameter's metadata. That is right for every state array of the parameter's
shape (moments, int8 codes) and wrong for the int8 block scales, a vector of
one entry per block: a 2-D parameter's axis names given to a 1-D vector make
``nn.get_partition_spec``, ``nnx.Optimizer`` and ``jax.jit``'s
``out_shardings`` fail.

So jadam treats a box as transparent metadata: state of the parameter's
shape keeps the parameter's box; block scales get a box whose axis names fit
them (:func:`box_scales`, by the rule of
:func:`jadam.sharding._placement.scales_follow_rows`), or none for box types whose
metadata jadam does not know. Flax is never imported here: a box can only
exist if Flax's module already is, so the classes are looked up in
``sys.modules``.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Optional

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AxisNames:
  """jadam's own box: an array with the axis names of its dimensions
  (mesh axes or logical names). :func:`jadam.sharding.state_specs` boxes the
  parameters in it to follow each name into the state, as Flax's boxes are
  followed."""

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
  """Whether ``x`` is a Flax metadata box (Linen ``AxisMetadata`` or an NNX
  ``Variable``)."""
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
  """``value`` in a box with ``box``'s type and metadata (``value`` itself if
  ``box`` is not a box, or ``value`` is None)."""
  if value is None or not is_box(box):
    return value
  return jax.tree.structure(box).unflatten([value])


def strip(tree: Any) -> Any:
  """``tree`` with every box replaced by the array inside it."""
  return jax.tree.map(open_box, tree, is_leaf=is_box)


def restore(boxed: Any, plain: Any) -> Any:
  """``plain`` (the structure of ``strip(boxed)``) put back into ``boxed``'s
  boxes.

  Per-parameter trees (gradients, moments, block scales) share the
  parameters' containers, but the scales' boxes carry axis names of their
  own, so jadam matches such trees with their boxes stripped and puts each
  result back into the boxes of the tree it came from.
  """
  return jax.tree.map(close_like, boxed, plain, is_leaf=is_box)


def _fitted_names(names: Any, keep_leading: bool) -> tuple:
  lead = names[0] if names else None
  return (lead if keep_leading else None,)


def box_scales(box: Any, scales: Optional[Any], keep_leading: bool) -> Any:
  """Block ``scales`` of the parameter in ``box``, boxed with metadata that
  fits a vector of blocks.

  The axis names become one name: the parameter's leading axis name where
  ``keep_leading`` (the blocks follow its rows), else None (replicated).
  Linen's ``Partitioned`` and ``LogicallyPartitioned`` and NNX variables
  keep their type and other metadata; boxes of other kinds are dropped, the
  scales returned bare.

  Args:
    box: the parameter as given to ``init`` (a box, or a bare array).
    scales: its block scales, or None when the moment is not int8.
    keep_leading: whether the scales split like the parameter's leading axis.
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

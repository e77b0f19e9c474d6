"""The fast path: parameters kept in one contiguous buffer per dtype.

A step on many small leaves costs mostly per-leaf overhead (one loop nest
per leaf and moment). ``FlatView`` packs the parameters into one 1-D buffer
per dtype (and group); the model reads its leaves back as static slices, so
the gradient comes out flat too, and any optimizer runs unchanged on the
buffers with the tree path's numerics, element for element.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Hashable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from jadam import _boxes
from jadam import _compat
from jadam import _groups

Array = jax.Array
PyTree = Any
LabelTree = Union[PyTree, Callable[[PyTree], PyTree]]


@dataclasses.dataclass(frozen=True)
class _Slot:
  """Where one leaf of the tree lives: buffer key, offset, shape, dtype."""

  key: str
  start: int
  shape: tuple[int, ...]
  dtype: np.dtype

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))


def _template(tree: PyTree) -> PyTree:
  """Shapes and dtypes of ``tree`` (arrays, ShapeDtypeStructs or scalars)."""
  def leaf(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    if not hasattr(x, "dtype"):
      x = np.asarray(x)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype)
  return jax.tree.map(leaf, tree)


def _labels(labels: Optional[LabelTree], template: PyTree,
            treedef: Any) -> list[Hashable]:
  """One label per leaf from a label tree, a callable, or None."""
  if labels is None:
    return [None] * treedef.num_leaves
  if callable(labels):
    labels = labels(template)
  try:
    return treedef.flatten_up_to(labels)
  except (ValueError, TypeError) as error:
    raise ValueError(
        "the labels (groups or mask) must have the structure of the tree the "
        f"FlatView was built from: {error}") from error


def _is_group_list(groups: Any) -> bool:
  return (isinstance(groups, (list, tuple)) and bool(groups)
          and all(isinstance(g, _groups.Group) for g in groups))


def _group_label(groups: tuple, index: int) -> Optional[str]:
  """The buffer label of a group: frozen and own-β groups apart."""
  if index == len(groups):
    return None
  group = groups[index]
  if group.frozen:
    return "frozen"
  if group.b1 is None and group.b2 is None:
    return None
  return ",".join(f"{name}={getattr(group, name)}" for name in ("b1", "b2")
                  if getattr(group, name) is not None)


def _buffer_key(dtype: np.dtype, label: Hashable) -> str:
  if label is None:
    return dtype.name
  return f"{dtype.name}/{label}"


class FlatView:
  """A fixed layout packing a pytree of arrays into one buffer per dtype.

  Static Python data, usable inside ``jax.jit``; ``ravel`` and ``unravel``
  are exact inverses (no arithmetic, no dtype change).

  Args:
    tree: the parameters (arrays, ``jax.ShapeDtypeStruct`` or scalars), all
      floating point or complex, else a TypeError.
    groups: a list of ``jadam.Group``: each buffer is ordered by group, so
      a group is one contiguous segment, and ``view.groups`` is the
      optimizer's ``groups`` argument (one pass, whatever the number of
      groups). Frozen groups go to buffers of their own, ``"<dtype>/frozen"``,
      which the optimizer leaves untouched and holds no moments for; groups
      with their own β1/β2 to ``"<dtype>/b1=…,b2=…"``. Or per-leaf labels
      with ``tree``'s structure (or a callable giving them), such as a
      weight-decay mask: each label gets its own buffers, so masks and
      ``optax.partition`` apply.

  Attributes:
    keys: buffer keys in order, ``"float32"`` or ``"float32/<label>"``.
    groups: with ``groups=[jadam.Group, ...]``, the layout to pass to the
      optimizer (``jadam.adamw(lr, groups=view.groups)``); else None.
    sizes: number of elements of each buffer, by key.
    size: total number of elements.

  Example:
    >>> import jax, jax.numpy as jnp, jadam
    >>> params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
    >>> view = jadam.FlatView(params)
    >>> flat = view.ravel(params)
    >>> flat["float32"].shape
    (9,)
    >>> loss = lambda flat: jnp.sum(view.unravel(flat)["w"] ** 2)
    >>> grads = jax.grad(loss)(flat)   # flat too: {"float32": f32[9]}
    >>> opt = jadam.adam(1e-3)
    >>> state = opt.init(flat)
    >>> updates, state = opt.update(grads, state, flat)
  """

  def __init__(self, tree: PyTree, groups: Optional[LabelTree] = None):
    template = _template(tree)
    leaves, self._treedef = jax.tree.flatten(template)
    entries = _compat.flatten_with_path(template)[0]
    for path, leaf in entries:
      if not jnp.issubdtype(np.dtype(leaf.dtype), jnp.inexact):
        raise TypeError(
            f"FlatView holds trainable parameters only, but the leaf at "
            f"{_compat.keystr(path)} has dtype {np.dtype(leaf.dtype)}; split "
            "non-float state (counters, RNG keys) out of the tree first, for "
            "example with nnx.split(model, nnx.Param, ...).")
    self.groups = None
    if _is_group_list(groups):
      layout = _groups.Layout(groups)
      member = _groups.assign(layout.groups, template)
      labels = [_group_label(layout.groups, k) for k in member]
      # Leaves ordered by group inside each buffer: one segment per group.
      order = sorted(range(len(entries)), key=lambda i: member[i])
    else:
      member, labels = None, _labels(groups, template, self._treedef)
      order = range(len(entries))
    sizes: dict[str, int] = {}
    slots: list[Optional[_Slot]] = [None] * len(entries)
    segments: dict[str, list] = {}
    for i in order:
      leaf = entries[i][1]
      dtype = np.dtype(leaf.dtype)
      key = _buffer_key(dtype, labels[i])
      slot = _Slot(key, sizes.get(key, 0), tuple(leaf.shape), dtype)
      sizes[key] = slot.start + slot.size
      slots[i] = slot
      if member is not None:
        found = segments.setdefault(key, [])
        if found and found[-1].group == member[i]:
          found[-1] = found[-1]._replace(stop=sizes[key])
        else:
          found.append(_groups.Segment(member[i], slot.start, sizes[key]))
    self._slots = tuple(slots)
    self._paths = tuple(_boxes.canonical_path(path) for path, _ in entries)
    self.keys = tuple(sorted(sizes))
    self.sizes = {key: sizes[key] for key in self.keys}
    self.size = sum(self.sizes.values())
    self._labels = tuple(labels)
    # Per buffer, its leaves in buffer order.
    self._order = {key: sorted((i for i, s in enumerate(self._slots)
                                if s.key == key),
                               key=lambda i: self._slots[i].start)
                   for key in self.keys}
    if member is not None:
      self.groups = _groups.Layout(layout.groups, {
          key: tuple(found) for key, found in segments.items()})

  def segments(self) -> list[tuple[str, str, int, tuple[int, ...]]]:
    """Each leaf's ``(path, buffer key, start, shape)``, in the tree's leaf
    order: where the numerics doctor finds a tensor in the buffers."""
    return [(path, slot.key, slot.start, slot.shape)
            for path, slot in zip(self._paths, self._slots)]

  def __repr__(self) -> str:
    buffers = ", ".join(f"{k}[{n}]" for k, n in self.sizes.items())
    return f"FlatView({len(self._slots)} leaves -> {buffers})"

  def ravel(self, tree: PyTree) -> dict[str, Array]:
    """Pack a tree with the view's structure and shapes into its buffers.

    Args:
      tree: parameters, gradients or the like.

    Returns:
      A dict from buffer key to a 1-D array.
    """
    leaves = self._treedef.flatten_up_to(tree)
    for slot, leaf in zip(self._slots, leaves):
      if tuple(np.shape(leaf)) != slot.shape:
        raise ValueError(
            f"leaf of shape {np.shape(leaf)} where the view has {slot.shape}")
    return {key: jnp.concatenate([
        jnp.ravel(jnp.asarray(leaves[i], self._slots[i].dtype))
        for i in self._order[key]]) for key in self.keys}

  def unravel(self, flat: dict[str, Array]) -> PyTree:
    """The tree whose leaves are static slices of ``flat``'s buffers.

    Args:
      flat: 1-D buffers as made by ``ravel`` (or updates, ``state.mu``...).

    Returns:
      The tree, with the structure the view was built from.
    """
    leaves: list[Any] = [None] * len(self._slots)
    for key in self.keys:
      buffer = flat[key]
      if buffer.shape != (self.sizes[key],):
        raise ValueError(f"buffer {key!r} has shape {buffer.shape}, the view "
                         f"expects ({self.sizes[key]},)")
      order = self._order[key]
      # lax.split, not a slice per leaf: its transpose is one concatenation.
      for i, piece in zip(order, jax.lax.split(
          buffer, [self._slots[i].size for i in order])):
        leaves[i] = piece.reshape(self._slots[i].shape)
    return self._treedef.unflatten(leaves)

  def mask(self, mask: LabelTree) -> dict[str, bool]:
    """A per-leaf boolean mask as a mask over the buffers, for optax.

    Args:
      mask: booleans with the view's tree structure, or a callable of its
        ``jax.ShapeDtypeStruct`` tree. A buffer holding leaves on both sides
        is a ValueError: build the view with ``groups=mask``.

    Returns:
      A dict from buffer key to bool, as in
      ``jadam.adamw(lr, mask=view.mask(decay_mask))``.
    """
    values = _labels(mask, self._treedef.unflatten(
        [jax.ShapeDtypeStruct(s.shape, s.dtype) for s in self._slots]),
                     self._treedef)
    per_key: dict[str, set] = {key: set() for key in self.keys}
    for slot, value in zip(self._slots, values):
      per_key[slot.key].add(bool(value))
    flat_mask = {}
    for key, seen in per_key.items():
      if len(seen) > 1:
        raise ValueError(
            f"buffer {key!r} holds leaves both inside and outside the mask; "
            "build the view with FlatView(params, groups=mask) so that they "
            "are stored in separate buffers.")
      flat_mask[key] = seen.pop()
    return flat_mask

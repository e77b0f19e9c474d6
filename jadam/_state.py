"""Reading optimizer states: decode, describe and convert their moments.

Everything reads the engine's declared moments (``_engine.moments_of``) and
the stored leaves, so it works for every optimizer, format and optax wrapper.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jadam import _boxes
from jadam import _compat
from jadam import _engine
from jadam import _formats
from jadam import _groups
from jadam import _rule
from jadam._formats import _codes
from jadam._formats import int8

Array = jax.Array
_FALLBACK = (_engine.Moment("mu"), _engine.Moment("nu", second=True),
             _engine.Moment("nu_max", second=True))


def _moments(state: Any) -> tuple[_engine.Moment, ...]:
  declared = _engine.moments_of(state)
  if declared is not None:
    return declared
  return tuple(m for m in _FALLBACK if getattr(state, m.field, None)
               is not None)


def _is_entry(x: Any) -> bool:
  return isinstance(x, int8.Int8Moment) or _boxes.is_box(x)


def decode_tree(tree: Any, dtype: Any, *, second: bool) -> Any:
  """Stored moments decoded to ``dtype``, in the moments' boxes."""
  def one(entry):
    box = entry.codes if isinstance(entry, int8.Int8Moment) else entry
    plain = _boxes.strip(entry)
    return _boxes.close_like(box, _formats.load(plain, dtype, second=second))
  return jax.tree.map(one, tree, is_leaf=_is_entry)


def decode_moments(state: Any, dtype: Any = jnp.float32) -> _rule.Moments:
  """The moments of a jadam state as ``dtype`` arrays, whatever the storage
  (int8 decoded with its scales, float16 √v squared; complex stays complex).

  Args:
    state: a jadam ``scale_by_*`` state (``state[0]`` of ``jadam.adam``'s).
    dtype: float dtype of the result.

  Returns:
    ``Moments(mu, nu, nu_max)``, trees shaped like the parameters: ``mu``
    the first moment (AdEMAMix's ``m1``; None if absent), ``nu`` v,
    ``nu_max`` AMSGrad's running maximum (else None).

  Example:
    >>> import jax.numpy as jnp, jadam
    >>> state = jadam.scale_by_adam(nu_dtype="int8").init({"w": jnp.ones(8192)})
    >>> state.nu["w"].codes.dtype, jadam.decode_moments(state).nu["w"].dtype
    (dtype('uint8'), dtype('float32'))
  """
  decoded = {m.field: decode_tree(getattr(state, m.field), dtype,
                                  second=m.second) for m in _moments(state)}
  return _rule.Moments(mu=decoded.get("m1", decoded.get("mu")),
                       nu=decoded.get("nu"), nu_max=decoded.get("nu_max"))


def moment_states(state: Any) -> list[tuple[str, Any]]:
  """Every engine state inside ``state``, with its key path."""
  is_node = lambda x: _engine.moments_of(x) is not None
  found = _compat.flatten_with_path(state, is_leaf=is_node)[0]
  return [(_compat.keystr(tuple(path)), node) for path, node in found
          if is_node(node)]


@dataclasses.dataclass(frozen=True)
class LeafSummary:
  """One parameter's row: key path (prefixed by its state's path when there
  are several states), shape, per moment field its format, and bytes."""

  path: str
  shape: tuple[int, ...]
  formats: Mapping[str, str]
  nbytes: int
  group: str = ""


@dataclasses.dataclass(frozen=True)
class StateSummary:
  """``describe``'s answer: a row per parameter and the totals.

  Attributes:
    leaves: a ``LeafSummary`` per parameter and moment state.
    n_params: parameters (elements) the moments are kept for.
    state_bytes: bytes of the whole state (every array in it).
  """

  leaves: tuple[LeafSummary, ...]
  n_params: int
  state_bytes: int

  @property
  def bytes_per_param(self) -> float:
    return self.state_bytes / max(self.n_params, 1)

  def __str__(self) -> str:
    fields = list(dict.fromkeys(f for row in self.leaves for f in row.formats))
    grouped = any(row.group for row in self.leaves)
    header = (["parameter", "shape"] + (["group"] if grouped else [])
              + fields + ["bytes"])
    rows = [[row.path or "<root>", "x".join(map(str, row.shape)) or "()"]
            + ([row.group] if grouped else [])
            + [row.formats.get(f, "") for f in fields] + [str(row.nbytes)]
            for row in self.leaves]
    widths = [max(len(r[i]) for r in [header] + rows)
              for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
             for r in [header] + rows]
    lines.append(f"{self.state_bytes} bytes of state for {self.n_params} "
                 f"parameters: {self.bytes_per_param:.2f} bytes/parameter")
    return "\n".join(lines)


def describe(state: Any, groups: Any = None) -> StateSummary:
  """Each moment's format and bytes per parameter (with ``nu_dtype="int8"``,
  which leaves are int8), and the whole state's bytes per parameter.

  Args:
    state: any jadam optimizer's state, in any optax wrapper (arrays or
      ``jax.ShapeDtypeStruct``s).
    groups: the optimizer's parameter groups, to show each leaf's group (a
      FlatView buffer lists the groups it holds). Frozen leaves hold no
      moments, so they have no row.

  Returns:
    A ``StateSummary``.

  Example:
    >>> import jax.numpy as jnp, jadam
    >>> tx = jadam.adam(1e-3, nu_dtype="int8")
    >>> summary = jadam.describe(tx.init({"w": jnp.zeros((64, 128)),
    ...                                   "b": jnp.zeros(128)}))
    >>> summary.leaves[1].formats["nu"]
    'int8 √v, block 128'
  """
  found = moment_states(state)
  group_of = _group_names(groups)
  rows, n_params = [], 0
  for state_path, node in found:
    moments = _moments(node)
    trees = [_boxes.strip(getattr(node, m.field)) for m in moments]
    entries = [_compat.flatten_with_path(
        tree, is_leaf=_formats.is_moment_leaf)[0] for tree in trees]
    for index, (path, first) in enumerate(entries[0]):
      leaf = first.codes if isinstance(first, int8.Int8Moment) else first
      shape = tuple(int(d) for d in leaf.shape)
      formats, nbytes = {}, 0
      for m, column in zip(moments, entries):
        stored = column[index][1]
        fmt = _formats.found(stored, shape, second=m.second)
        formats[m.field] = str(fmt)
        nbytes += fmt.nbytes(shape)
      prefix = state_path if len(found) > 1 else ""
      rows.append(LeafSummary(prefix + _compat.keystr(tuple(path)), shape,
                              formats, nbytes, group_of(path, shape)))
      n_params += math.prod(shape)
  state_bytes = sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
                    for x in jax.tree.leaves(state) if hasattr(x, "dtype"))
  return StateSummary(tuple(rows), n_params, state_bytes)


def _group_names(groups: Any):
  """``(path, shape) -> group name(s)`` for ``describe``'s rows."""
  if groups is None:
    return lambda path, shape: ""
  layout = _groups.as_layout(groups)

  def name(path, shape):
    key = _groups.canonical_path(path)
    if layout.buffer_segments is not None:
      return "+".join(layout.name(s.group)
                      for s in layout.buffer_segments.get(key, ()))
    struct = jax.ShapeDtypeStruct(shape, jnp.float32)
    return layout.name(next(
        (k for k, g in enumerate(layout.groups) if g.matches(key, struct)),
        len(layout.groups)))
  return name


def convert_state(state: Any, optimizer: Any, params: Any) -> Any:
  """``state`` re-stored in ``optimizer``'s formats, moments rounded to
  nearest and the rest copied: to resume with other storage (float32 to
  int8, say), or to load a pre-0.2 checkpoint (``QuantizedAdamState`` and
  its kin) restored without a target.

  Args:
    state: a state of the same structure, or its raw restored dicts.
    optimizer: the optax transformation to continue with.
    params: the parameters (arrays, with their shardings).

  Returns:
    A state with the structure of ``optimizer.init(params)``.

  Example:
    >>> import jax.numpy as jnp, jadam
    >>> params = {"w": jnp.ones((64, 128))}
    >>> state = jadam.adam(1e-3).init(params)
    >>> lean = jadam.adam(1e-3, nu_dtype="int8")
    >>> state = jadam.convert_state(state, lean, params)
    >>> type(state[0].nu["w"]).__name__
    'Int8Moment'
  """
  target = optimizer.init(params)
  plain = _convert(_boxes.strip(target), _boxes.strip(state))
  return _boxes.restore(target, plain)


def _get(source: Any, name: Any, index: int) -> Any:
  """Field ``name`` (or element ``index``) of a live or raw node."""
  if isinstance(source, Mapping):
    for key in (name, str(name), str(index), index):
      if key in source:
        return source[key]
    return None
  if isinstance(source, (list, tuple)) and not hasattr(source, "_fields"):
    return source[index] if index < len(source) else None
  return getattr(source, str(name), None)


def _convert(target: Any, source: Any) -> Any:
  if _engine.moments_of(target) is not None:
    return _convert_moment_state(target, source)
  if isinstance(target, int8.Int8Moment) or not isinstance(
      target, (tuple, list, dict)):
    if target is None:
      return None
    return _like(target, source)
  if isinstance(target, dict):
    return type(target)({k: _convert(v, _get(source, k, i))
                         for i, (k, v) in enumerate(target.items())})
  fields = getattr(target, "_fields", None)
  values = [_convert(v, _get(source, i if fields is None else fields[i], i))
            for i, v in enumerate(target)]
  return type(target)(values) if fields is None else type(target)(*values)


def _like(target: Array, source: Any) -> Array:
  value = jnp.asarray(np.asarray(source), dtype=target.dtype)
  return jax.device_put(value, target.sharding) if hasattr(
      target, "sharding") else value


def _convert_moment_state(target: Any, source: Any) -> Any:
  fields = {}
  for name in target._fields:
    moment = next((m for m in _engine.moments_of(target) if m.field == name),
                  None)
    new = getattr(target, name)
    if moment is None:
      fields[name] = _convert(new, _get(source, name, 0))
      continue
    old = _get(source, name, 0)
    scales = _old_scales(source, name, old)
    leaves, treedef = jax.tree.flatten(new, is_leaf=_formats.is_moment_leaf)
    olds = _up_to(new, old)
    old_scales = ([None] * len(leaves) if scales is None
                  else _up_to(new, scales))
    fields[name] = treedef.unflatten([
        _reencode(t, o, sc, moment.second)
        for t, o, sc in zip(leaves, olds, old_scales)])
  return type(target)(**fields)


def _old_scales(source: Any, name: str, old_tree: Any) -> Any:
  """Moment ``name``'s block scales in a pre-0.2 state's ``scales`` field (by
  name, or the bare tree of a one-moment state), or None."""
  scales = _get(source, "scales", -1)
  if scales is None:
    return None
  by_name = _get(scales, name, -1) if isinstance(scales, Mapping) or hasattr(
      scales, "_fields") else None
  if by_name is not None:
    return by_name
  if isinstance(scales, Mapping) and set(scales) & {"mu", "nu", "nu_max",
                                                    "m1", "m2"}:
    return None
  return scales if jax.tree.structure(old_tree, is_leaf=lambda x: x is None) \
      == jax.tree.structure(scales, is_leaf=lambda x: x is None) else None


def _up_to(new: Any, old: Any) -> list[Any]:
  """``old``'s entries at ``new``'s moment leaves, by key path (raw
  checkpoints hold dicts where the state has tuples)."""
  paths = _compat.flatten_with_path(new, is_leaf=_formats.is_moment_leaf)[0]
  out = []
  for path, _ in paths:
    node = old
    for i, key in enumerate(path):
      name = getattr(key, "key", getattr(key, "name", getattr(key, "idx",
                                                              None)))
      node = _get(node, name, name if isinstance(name, int) else i)
    out.append(node)
  return out


def _reencode(target: Any, old: Any, scales: Optional[Any],
              second: bool) -> Any:
  """One moment: the old stored leaf decoded, stored as ``target`` is."""
  if isinstance(old, Mapping) and {"codes", "scales"} <= set(old):
    old = int8.Int8Moment(old["codes"], old["scales"])
  if isinstance(old, int8.Int8Moment):
    old = int8.Int8Moment(jnp.asarray(old.codes), jnp.asarray(old.scales))
  else:
    old = jnp.asarray(old)
    if old.dtype in (jnp.int8, jnp.uint8):
      if scales is None:
        raise ValueError("an int8 moment of an old checkpoint has no block "
                         "scales beside it; pass the whole optimizer state.")
      old = int8.Int8Moment(old, jnp.asarray(scales))
  value = _formats.load(old, jnp.float32 if not jnp.iscomplexobj(
      old if not isinstance(old, int8.Int8Moment) else old.codes)
                        else jnp.complex64, second=second)
  if isinstance(target, int8.Int8Moment):
    fmt = int8.found(target, tuple(target.codes.shape))
    if fmt.root:
      value = jnp.sqrt(value)
    codes, new_scales = _codes.quantize(value, fmt.signed, fmt.block)
    return int8.Int8Moment(_like(target.codes, codes),
                           _like(target.scales, new_scales))
  fmt = _formats.found(target, tuple(target.shape), second=second)
  if fmt.root:
    value = jnp.sqrt(value)
  return _like(target, value.astype(fmt.dtype))

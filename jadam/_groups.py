"""Parameter groups: per-group hyperparameters in the optimizer's one pass.

A ``Group`` picks parameters by their canonical key path (``param_paths``)
and gives them their own learning rate, weight decay, ε, β1/β2, or freezes
them. The grouped optimizer is one engine walk whatever the number of
groups: each leaf (or, on a ``FlatView``, each contiguous segment of a
buffer) steps with its group's values. β1 and β2 are compiled in; the
learning rate (or, under a schedule, its scale), the weight decay and ε live
in a state element of their own, ``GroupHyperparamsState``, and can be set
between steps without recompiling (``set_group_hyperparams``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jadam import _boxes
from jadam import _compat
from jadam import _engine
from jadam import _probe
from jadam import _skip
from jadam import _validation
from jadam.sharding import _placement

Array = jax.Array
ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]

# The group of the leaves no ``Group`` matches: the optimizer's own values.
DEFAULT = "default"
# The hyperparameters a group may set, and which of them live in state.
HYPERPARAMETERS = ("learning_rate", "lr_scale", "weight_decay", "eps", "b1",
                   "b2")
RUNTIME = ("learning_rate", "lr_scale", "weight_decay", "eps")


@dataclasses.dataclass(frozen=True)
class Group:
  """Parameters picked by key path, with hyperparameters of their own.

  Args:
    name: the group's name, used to read and set its values in the state.
    match: a regular expression matched with ``re.fullmatch`` against each
      leaf's canonical path (see ``jadam.param_paths``), or a callable
      ``(path, leaf) -> bool`` given the path and a ``jax.ShapeDtypeStruct``.
      The first group that matches a leaf takes it.
    learning_rate: the group's own rate, a number or an optax schedule.
    lr_scale: a factor on the optimizer's rate (exclusive with
      ``learning_rate``); on a schedule it stays in the state, so it can be
      changed at run time.
    weight_decay: the group's decoupled weight decay λ (only for optimizers
      with weight decay).
    eps: the group's ε.
    b1, b2: the group's β1, β2: compiled in (changing them recompiles).
    frozen: the group is not trained: zero updates, no moments.

  Example:
    >>> import jadam
    >>> no_decay = jadam.Group("no_decay", match=r".*(bias|scale)",
    ...                        weight_decay=0.0)
  """

  name: str
  match: Union[str, Callable[[str, Any], Any]]
  learning_rate: Optional[ScalarOrSchedule] = None
  lr_scale: Optional[float] = None
  weight_decay: Optional[float] = None
  eps: Optional[float] = None
  b1: Optional[float] = None
  b2: Optional[float] = None
  frozen: bool = False

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f"a Group's name must be a non-empty string, got "
                       f"{self.name!r}.")
    if self.name == DEFAULT:
      raise ValueError(f"the group name {DEFAULT!r} is reserved for the "
                       "leaves no group matches; choose another name.")
    if isinstance(self.match, str):
      try:
        re.compile(self.match)
      except re.error as error:
        raise ValueError(f"group {self.name!r}: match {self.match!r} is not "
                         f"a regular expression: {error}.") from error
    elif not callable(self.match):
      raise TypeError(f"group {self.name!r}: match must be a regular "
                      f"expression or a callable (path, leaf) -> bool, got "
                      f"{self.match!r}.")
    if self.learning_rate is not None and self.lr_scale is not None:
      raise ValueError(
          f"group {self.name!r} sets both learning_rate and lr_scale; give "
          "one: learning_rate replaces the optimizer's rate, lr_scale "
          "multiplies it.")
    given = [k for k in HYPERPARAMETERS if getattr(self, k) is not None]
    if self.frozen and given:
      raise ValueError(f"group {self.name!r} is frozen, so it takes no "
                       f"hyperparameters; it sets {', '.join(given)}.")
    if self.learning_rate is not None:
      _validation.check_learning_rate(self.learning_rate)
    for name in ("lr_scale", "weight_decay", "eps"):
      if getattr(self, name) is not None:
        _validation.check_nonnegative(f"group {self.name!r}: {name}",
                                      getattr(self, name))
    for name in ("b1", "b2"):
      if getattr(self, name) is not None:
        _validation.check_decay(f"group {self.name!r}: {name}",
                                getattr(self, name))

  def matches(self, path: str, leaf: jax.ShapeDtypeStruct) -> bool:
    """Whether this group takes the leaf at canonical ``path``."""
    if isinstance(self.match, str):
      return re.fullmatch(self.match, path) is not None
    out = self.match(path, leaf)
    if not isinstance(out, (bool, np.bool_)):
      raise TypeError(f"group {self.name!r}: match({path!r}, leaf) returned "
                      f"{out!r} of type {type(out).__name__}; it must return "
                      "a Python or NumPy bool.")
    return bool(out)


canonical_path = _boxes.canonical_path


def param_paths(params: Any) -> Any:
  """Each leaf's canonical path, the string a ``Group``'s ``match`` sees.

  Args:
    params: the parameters (a Flax Linen or NNX tree included).

  Returns:
    A tree with the structure of ``params`` (boxes opened) holding strings.

  Example:
    >>> import jax.numpy as jnp, jadam
    >>> jadam.param_paths({"dense": {"kernel": jnp.ones(2),
    ...                              "bias": jnp.ones(2)}})
    {'dense': {'bias': 'dense/bias', 'kernel': 'dense/kernel'}}
  """
  return _compat.map_with_path(lambda path, _: canonical_path(path),
                               _boxes.strip(params))


def _struct(x: Any) -> jax.ShapeDtypeStruct:
  if not hasattr(x, "dtype"):
    x = np.asarray(x)
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype)


def assign(groups: Sequence[Group], plain: Any) -> list[int]:
  """Per leaf of the box-free tree ``plain``, the index of the first group
  that matches it (``len(groups)``: none). A ValueError for a group that
  matches no leaf."""
  entries = _compat.flatten_with_path(plain)[0]
  paths = [canonical_path(path) for path, _ in entries]
  out = []
  for path, (_, leaf) in zip(paths, entries):
    struct = _struct(leaf)
    out.append(next((k for k, group in enumerate(groups)
                     if group.matches(path, struct)), len(groups)))
  for k, group in enumerate(groups):
    # A tree without leaves (optax.tree_map_params's placeholder) has no
    # paths to match.
    if entries and k not in out:
      shown = ", ".join(repr(p) for p in paths[:6])
      more = f" and {len(paths) - 6} more" if len(paths) > 6 else ""
      raise ValueError(
          f"group {group.name!r} (match={group.match!r}) matches no "
          f"parameter. The canonical paths are {shown}{more}; "
          "jadam.param_paths(params) lists them all.")
  return out


class Segment(NamedTuple):
  """Positions ``start`` to ``stop`` of a leaf (a flat buffer) belong to
  group ``group`` (an index; ``len(groups)`` is the default group)."""

  group: int
  start: int
  stop: int


class Layout:
  """Where each group's parameters are: per leaf, its segments.

  Built from a list of ``Group``s (matched on the tree's paths: one segment
  per leaf) or by ``FlatView`` (a buffer holds several groups, each one
  contiguous segment). The optimizer's ``groups`` argument accepts both.
  """

  def __init__(self, groups: Sequence[Group],
               segments: Optional[dict[str, tuple[Segment, ...]]] = None):
    self.groups = tuple(groups)
    names = [g.name for g in self.groups]
    if len(set(names)) != len(names):
      raise ValueError(f"group names must be distinct, got {names}.")
    for group in self.groups:
      if not isinstance(group, Group):
        raise TypeError(f"groups must be jadam.Group objects, got {group!r}.")
    self._segments = segments  # per buffer key, for a FlatView's buffers

  def __repr__(self) -> str:
    return f"Layout({[g.name for g in self.groups]})"

  def segments(self, plain: Any) -> list[tuple[Segment, ...]]:
    """Per leaf of ``plain`` (boxes opened), its segments."""
    leaves = jax.tree.leaves(plain)
    if self._segments is None:
      return [(Segment(k, 0, math.prod(np.shape(leaf))),)
              for k, leaf in zip(assign(self.groups, plain), leaves)]
    keys = [canonical_path(path)
            for path, _ in _compat.flatten_with_path(plain)[0]]
    if sorted(keys) != sorted(self._segments):
      raise ValueError(
          f"these groups come from a FlatView with buffers "
          f"{sorted(self._segments)}, but the optimizer got a tree with "
          f"leaves {keys}: pass the view's buffers (view.ravel(params)).")
    return [self._segments[key] for key in keys]

  @property
  def buffer_segments(self) -> Optional[dict[str, tuple[Segment, ...]]]:
    """A FlatView's segments per buffer key, or None for matched groups."""
    return self._segments

  def name(self, index: int) -> str:
    return DEFAULT if index == len(self.groups) else self.groups[index].name


def as_layout(groups: Any) -> Layout:
  """The optimizer's ``groups`` argument as a ``Layout``."""
  if isinstance(groups, Layout):
    return groups
  if isinstance(groups, Group):
    groups = [groups]
  if not isinstance(groups, (list, tuple)):
    raise TypeError(f"groups must be a list of jadam.Group or a FlatView's "
                    f"view.groups, got {groups!r}.")
  return Layout(groups)


class GroupHyperparamsState(NamedTuple):
  """The runtime hyperparameters of parameter groups.

  Attributes:
    count: steps taken (int32), what group schedules are evaluated at; held
      on a skipped step.
    hyperparams: group name -> {"learning_rate" or "lr_scale",
      "weight_decay" (if the optimizer has it), "eps"} as float32 scalars.
      ``"default"`` is the leaves no group matches.
  """

  count: Array
  hyperparams: dict


class _Config(NamedTuple):
  """One group's resolved configuration (static)."""

  frozen: bool
  b1: Any
  b2: Any
  schedule: Optional[Callable]  # compiled in, or None for a state value
  initial: dict  # runtime name -> its initial value


def _configs(layout: Layout, defaults: dict, learning_rate: Any,
             weight_decay: Any) -> list[_Config]:
  """Each group's configuration, the default group last."""
  out = []
  for group in layout.groups + (Group("_", ".*"),):
    if group.frozen:
      out.append(_Config(True, None, None, None, {}))
      continue
    if group.weight_decay is not None and weight_decay is None:
      raise ValueError(
          f"group {group.name!r} sets weight_decay, but this optimizer has "
          "no weight decay; use the decoupled form (adamw rather than adam).")
    schedule, initial = None, {}
    if group.learning_rate is not None:
      rate = group.learning_rate
    else:
      rate = learning_rate
    if callable(rate):
      schedule = rate
      initial["lr_scale"] = 1.0 if group.lr_scale is None else group.lr_scale
    else:
      initial["learning_rate"] = (rate if group.lr_scale is None
                                  else rate * group.lr_scale)
    if weight_decay is not None:
      initial["weight_decay"] = (weight_decay if group.weight_decay is None
                                 else group.weight_decay)
    initial["eps"] = defaults["eps"] if group.eps is None else group.eps
    b1 = defaults["b1"] if group.b1 is None else group.b1
    b2 = defaults["b2"] if group.b2 is None else group.b2
    out.append(_Config(False, b1, b2, schedule, initial))
  return out


def _scalar(value: Any) -> Array:
  return jnp.asarray(value, jnp.float32)


def _per_position(values: list[Array], segments: tuple[Segment, ...],
                  size: int) -> Array:
  """One value per segment as a value per position: a scalar for one
  segment, else an iota compared with the segments' static starts (never a
  constant index array, whose size would be the buffer's)."""
  if len(segments) == 1:
    return values[0]
  index = jax.lax.iota(jnp.int32, size)
  out = values[0]
  for segment, value in zip(segments[1:], values[1:]):
    out = jnp.where(index >= segment.start, value, out)
  return out


def _masked(tree: Any, frozen: list[bool]) -> Any:
  """``tree`` (boxes kept) with its frozen leaves replaced by MaskedNode."""
  flags = iter(frozen)
  return jax.tree.map(
      lambda x: optax.MaskedNode() if next(flags) else x, tree,
      is_leaf=_boxes.is_box)


def grouped(make: Callable[..., _engine.Spec], defaults: dict,
            learning_rate: ScalarOrSchedule,
            weight_decay: Optional[float], groups: Any, mask: Any = None
            ) -> optax.GradientTransformationExtraArgs:
  """An optimizer (scaling, decoupled decay, −α) with parameter groups.

  ``make(**overrides)`` builds the scaling's ``Spec`` with ``b1``, ``b2``
  and ``eps`` replaced; ``defaults`` holds the optimizer's own. The state is
  ``(moment state, GroupHyperparamsState)``; frozen leaves hold
  ``optax.MaskedNode`` in the moments and get zero updates.
  """
  layout = as_layout(groups)
  if mask is not None:
    raise ValueError(
        "give either mask or groups: with groups, leave decay off a set of "
        "parameters with jadam.Group(name, match=..., weight_decay=0.0).")
  if callable(weight_decay):
    raise ValueError(
        "a scheduled weight_decay cannot be combined with groups: the "
        "groups' weight decay lives in the state. Give a number and change "
        "it with jadam.set_group_hyperparams.")
  configs = _configs(layout, defaults, learning_rate, weight_decay)
  spec = make()

  def frozen_flags(segments):
    flags = []
    for leaf_segments in segments:
      kinds = {configs[s.group].frozen for s in leaf_segments}
      if len(kinds) > 1:
        raise ValueError("a buffer mixes frozen and trained groups; build "
                         "the FlatView with the groups.")
      flags.append(kinds.pop())
    return flags

  def init_fn(params):
    plain = _boxes.strip(params)
    frozen = frozen_flags(layout.segments(plain))
    trees = _engine.init_moments(_masked(params, frozen), spec.moments,
                                 spec.formats)
    zero = lambda: jnp.zeros([], jnp.int32)
    moments = spec.state_class(
        count=zero(), **{name: zero() for name in spec.counters or {}},
        **{m.field: tree for m, tree in zip(spec.moments, trees)})
    hyper = GroupHyperparamsState(zero(), {
        layout.name(k): {name: _scalar(v) for name, v in c.initial.items()}
        for k, c in enumerate(configs) if not c.frozen})
    return _placement.place_scalars((moments, hyper), params)

  def update_fn(updates, state, params=None, **extra_args):
    moments, hyper = state
    if not isinstance(hyper, GroupHyperparamsState):
      raise ValueError("this state was not made by an optimizer with groups "
                       "(it has no GroupHyperparamsState).")
    if weight_decay is not None and params is None:
      raise ValueError("weight decay needs the parameters: call "
                       "update(grads, state, params).")
    decision, skip, t = _skip.read(extra_args, moments.count)
    plain = _boxes.strip(updates)
    segments = layout.segments(plain)
    frozen = frozen_flags(segments)
    values = {}  # per group index, its runtime values this step
    for k, config in enumerate(configs):
      if config.frozen:
        continue
      stored = hyper.hyperparams[layout.name(k)]
      if config.schedule is not None:
        rate = config.schedule(hyper.count) * stored["lr_scale"]
      else:
        rate = stored["learning_rate"]
      values[k] = dict(stored, rate=rate)
    leaves = jax.tree.leaves(plain)
    rules, cache = [], {}
    for leaf, leaf_segments, is_frozen in zip(leaves, segments, frozen):
      if is_frozen:
        continue
      # One rule per group, so its leaves share its bias corrections as in
      # optax (see _rule.Corrections).
      key = (leaf_segments[0].group if len(leaf_segments) == 1
             else tuple(leaf_segments))
      if key not in cache:
        first = configs[leaf_segments[0].group]
        if any((configs[s.group].b1, configs[s.group].b2)
               != (first.b1, first.b2) for s in leaf_segments):
          raise ValueError("a buffer mixes groups with different b1/b2; "
                           "build the FlatView with the groups.")
        eps = _per_position([values[s.group]["eps"] for s in leaf_segments],
                            leaf_segments, leaf.size)
        cache[key] = make(b1=first.b1, b2=first.b2, eps=eps).rule(
            moments, t, skip)
      rules.append(cache[key])
    stored_trees = [getattr(moments, m.field) for m in spec.moments]
    directions, trees = _engine.walk(
        rules, _masked(updates, frozen), t, stored_trees, spec.formats,
        spec.moments, None if params is None else _masked(params, frozen),
        probe=_probe.read(extra_args))
    new_moments = moments._replace(
        count=t, **{name: fn(moments, skip)
                    for name, fn in (spec.counters or {}).items()},
        **{m.field: tree for m, tree in zip(spec.moments, trees)})
    count = optax.safe_increment(hyper.count)
    if skip is not None:
      count = jnp.where(skip, hyper.count, count)  # schedules see it held
    new_hyper = hyper._replace(count=count)
    param_leaves = (jax.tree.leaves(_boxes.strip(params))
                    if params is not None else [None] * len(leaves))
    direction_leaves = iter(jax.tree.leaves(_boxes.strip(directions)))
    out = []
    for leaf, leaf_segments, is_frozen, param in zip(
        leaves, segments, frozen, param_leaves):
      if is_frozen:
        out.append(jnp.zeros_like(leaf))
        continue
      u = next(direction_leaves)
      per = lambda name: _per_position(
          [values[s.group][name] for s in leaf_segments], leaf_segments,
          leaf.size)
      if weight_decay is not None:
        # optax.add_decayed_weights: g + λ·θ, λ in the parameter's dtype.
        u = u + per("weight_decay").astype(param.dtype) * param
      # optax.scale_by_learning_rate: (−α) · u, α in the update's dtype.
      u = (-per("rate")).astype(u.dtype) * u
      out.append(u)
    new_updates = _boxes.restore(updates, jax.tree.structure(plain).unflatten(
        out))
    _skip.record(decision, moments, new_moments)
    _skip.record(decision, hyper, new_hyper)
    return new_updates, (new_moments, new_hyper)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _hyper_state(state: Any) -> GroupHyperparamsState:
  """The one ``GroupHyperparamsState`` inside ``state``."""
  is_hyper = lambda x: isinstance(x, GroupHyperparamsState)
  found = [x for x in jax.tree.leaves(state, is_leaf=is_hyper)
           if is_hyper(x)]
  if len(found) != 1:
    raise ValueError(f"expected one optimizer with groups in this state, "
                     f"found {len(found)}.")
  return found[0]


def group_hyperparams(state: Any) -> dict:
  """The groups' runtime hyperparameters in ``state``.

  Args:
    state: the state of an optimizer made with ``groups``, in any wrapper
      (``nnx.Optimizer.opt_state`` included).

  Returns:
    ``{group name: {hyperparameter: float32 scalar}}``.

  Example:
    >>> import jax.numpy as jnp, jadam
    >>> tx = jadam.adamw(1e-3, groups=[jadam.Group("b", r".*b", eps=1e-6)])
    >>> state = tx.init({"w": jnp.ones(2), "b": jnp.ones(2)})
    >>> jadam.group_hyperparams(state)["b"]["eps"]
    Array(1.e-06, dtype=float32)
  """
  return jax.tree.map(_boxes.open_box, _hyper_state(state).hyperparams,
                      is_leaf=_boxes.is_box)


def _replaced(old: Any, value: Any, what: str) -> Any:
  """``value`` with ``old``'s dtype, shape, sharding and memory kind (and
  its NNX box), so a jitted step taking it does not trace again."""
  concrete = _validation.concrete(value)
  if concrete is not None:
    _validation.check_nonnegative(what, value)
  array = _boxes.open_box(old)
  if (concrete is not None and isinstance(array, jax.Array)
      and not _compat.is_tracer(array) and array.committed):
    # Committed where the old value is (its memory kind included), straight
    # from the host value: a device array moved to host memory by
    # device_put cannot be donated on XLA:CPU (JAX 0.10).
    new = jax.device_put(concrete.astype(array.dtype).reshape(array.shape),
                         array.sharding)
  else:
    # Uncommitted stays uncommitted: jit compiles again for a change.
    new = jnp.asarray(value, array.dtype).reshape(np.shape(array))
  return _boxes.close_like(old, new)


def set_group_hyperparams(state: Any, **groups: dict) -> Any:
  """``state`` with some groups' runtime hyperparameters replaced.

  Each value keeps the stored dtype (float32, not weakly typed), shape,
  sharding and memory kind, so a jitted (donated, sharded, offloaded) step
  does not compile again. A group with a scheduled learning rate takes
  ``lr_scale``, one with a constant rate ``learning_rate``.

  Args:
    state: the state of an optimizer made with ``groups``, in any wrapper.
    **groups: group name -> {hyperparameter: new value}.

  Returns:
    The new state (the old one is unchanged).

  Raises:
    ValueError: for an unknown group or hyperparameter, or one the group
      does not hold in state.

  Example:
    >>> import jax.numpy as jnp, jadam
    >>> tx = jadam.adamw(1e-3, groups=[jadam.Group("b", r".*b")])
    >>> state = tx.init({"w": jnp.ones(2), "b": jnp.ones(2)})
    >>> state = jadam.set_group_hyperparams(state, b={"learning_rate": 1e-4})
  """
  target = _hyper_state(state)
  current = target.hyperparams
  new = dict(current)
  for name, changes in groups.items():
    if name not in current:
      raise ValueError(f"no group {name!r} with runtime hyperparameters; the "
                       f"groups are {sorted(current)} (frozen groups hold "
                       "none).")
    if not isinstance(changes, dict):
      raise TypeError(f"{name}= takes a dict of hyperparameters, got "
                      f"{changes!r}.")
    entry = dict(current[name])
    for key, value in changes.items():
      if key not in entry:
        if key == "learning_rate" and "lr_scale" in entry:
          hint = (" Its learning rate is a schedule, compiled in; set "
                  "lr_scale, which multiplies it.")
        elif key == "lr_scale" and "learning_rate" in entry:
          hint = " Its learning rate is a constant: set learning_rate."
        elif key == "weight_decay":
          hint = " This optimizer has no weight decay."
        elif key in ("b1", "b2"):
          hint = (" b1 and b2 are compiled in: build the optimizer again "
                  "with the new value (the step compiles again).")
        elif key not in HYPERPARAMETERS:
          hint = f" The hyperparameters are {sorted(entry)}."
        else:
          hint = ""
        raise ValueError(f"group {name!r} has no runtime {key!r}.{hint}")
      entry[key] = _replaced(entry[key], value, f"group {name!r}: {key}")
    new[name] = entry
  return jax.tree.map(
      lambda x: x._replace(hyperparams=new) if x is target else x, state,
      is_leaf=lambda x: x is target)


def reset_group(state: Any, optimizer: optax.GradientTransformation,
                params: Any, groups: Any, name: str) -> Any:
  """``state`` with group ``name``'s moments started afresh.

  A fine-tuning stage change in one call: pass the same optimizer to reset a
  group, or one where the group is no longer frozen to unfreeze it (or newly
  frozen to freeze it). The group's leaves get fresh moments, every other
  leaf keeps its own; the groups' runtime values and counts are kept.

  Args:
    state: the current state.
    optimizer: the optimizer the returned state is for (same wrappers).
    params: the parameters (a FlatView's buffers for a view's groups).
    groups: ``optimizer``'s groups.
    name: the group to restart.

  Returns:
    A state for ``optimizer``.

  Example:
    >>> import jax.numpy as jnp, jadam
    >>> params = {"w": jnp.ones(2), "b": jnp.ones(2)}
    >>> frozen = [jadam.Group("b", r"b", frozen=True)]
    >>> state = jadam.adam(1e-3, groups=frozen).init(params)
    >>> trained = [jadam.Group("b", r"b")]
    >>> tx = jadam.adam(1e-3, groups=trained)
    >>> state = jadam.reset_group(state, tx, params, trained, "b")
    >>> state[0].mu["b"]
    Array([0., 0.], dtype=float32)
  """
  layout = as_layout(groups)
  names = [g.name for g in layout.groups] + [DEFAULT]
  if name not in names:
    raise ValueError(f"no group {name!r}; the groups are {names}.")
  index = names.index(name)
  plain = _boxes.strip(params)
  segments = layout.segments(plain)
  leaves, treedef = jax.tree.flatten(plain)
  fresh = optimizer.init(params)
  is_node = lambda x: (_engine.moments_of(x) is not None
                       or isinstance(x, GroupHyperparamsState))
  fresh_nodes, outer = jax.tree.flatten(fresh, is_leaf=is_node)
  old_nodes = jax.tree.leaves(state, is_leaf=is_node)
  if len(old_nodes) != len(fresh_nodes):
    raise ValueError("reset_group: the state does not have the optimizer's "
                     "structure (its wrappers differ).")

  def entry(new, old, leaf, leaf_segments):
    mine = [s for s in leaf_segments if s.group == index]
    masked = lambda x: isinstance(x, optax.MaskedNode)
    if not mine:
      return new if masked(old) or masked(new) else old
    if len(mine) == len(leaf_segments) or masked(old) or masked(new):
      return new
    if not isinstance(new, jax.Array) or not isinstance(old, jax.Array):
      raise ValueError(f"group {name!r} shares an int8-stored buffer with "
                       "other groups; int8 blocks cannot be reset in part.")
    position = jax.lax.iota(jnp.int32, leaf.size)
    inside = functools.reduce(jnp.logical_or, [
        (position >= s.start) & (position < s.stop) for s in mine])
    return jnp.where(inside, new, old)

  out = []
  for new, old in zip(fresh_nodes, old_nodes):
    if isinstance(new, GroupHyperparamsState):
      merged = {n: old.hyperparams.get(n, v)
                for n, v in new.hyperparams.items()}
      out.append(new._replace(count=old.count, hyperparams=merged))
    elif _engine.moments_of(new) is not None:
      fields = {}
      for moment in _engine.moments_of(new):
        new_tree = getattr(new, moment.field)
        news = treedef.flatten_up_to(_boxes.strip(new_tree))
        olds = treedef.flatten_up_to(_boxes.strip(getattr(old, moment.field)))
        fields[moment.field] = _boxes.restore(new_tree, treedef.unflatten([
            entry(*row) for row in zip(news, olds, leaves, segments)]))
      out.append(old._replace(**fields))
    else:
      out.append(old)
  return outer.unflatten(out)

"""The Adam rule walked over a pytree, as Optax GradientTransformations.

Each public function here is a thin choice of :class:`jadam._rule.AdamRule`
flags. :func:`walk` is the one place in the package that walks a tree of
gradients and moments (every optimizer, the variants of
:mod:`jadam._variants` included, hands it a :class:`jadam._rule.LeafRule`),
and :func:`_scale_by_rule` keeps the Adam family's state around it.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from jadam import _boxes
from jadam import _compat
from jadam import _quant
from jadam import _rounding
from jadam import _rule
from jadam import _sharding
from jadam import _storage
from jadam import _validation

Array = jax.Array
ArrayLike = jax.typing.ArrayLike


# Where jadam keeps what optax keeps, its state *is* optax's: the same
# NamedTuple classes, so that tree structures match, isinstance holds, and a
# checkpoint written by one restores into the other. Only int8 moments, which
# optax has no equivalent of, add a class with the block scales.
ScaleByAdamState = optax.ScaleByAdamState
ScaleByAmsgradState = optax.ScaleByAmsgradState


class QuantizedAdamState(NamedTuple):
  """:class:`ScaleByAdamState` when a moment is stored as block-wise int8.

  Attributes:
    count, mu, nu: as in :class:`ScaleByAdamState` (int8 moments hold codes).
    scales: ``Moments(mu, nu, nu_max)`` of trees of float32 block scales
      (None where a leaf is not quantized).
      :func:`jadam.decode_moments` reads the moments back.
  """

  count: jax.Array
  mu: Any
  nu: Any
  scales: Any


class QuantizedAmsgradState(NamedTuple):
  """:class:`ScaleByAmsgradState` with int8 block scales (see
  :class:`QuantizedAdamState`)."""

  count: jax.Array
  mu: Any
  nu: Any
  nu_max: Any
  scales: Any


# Every state class of the Adam family defined here, for code that looks for
# moments inside a composed optax state.
ADAM_STATES = (ScaleByAdamState, QuantizedAdamState, ScaleByAmsgradState,
               QuantizedAmsgradState)


def adam_state(count, mu, nu, scales=None):
  """The plain state, or the quantized one when int8 block scales exist."""
  if scales is None:
    return ScaleByAdamState(count, mu, nu)
  return QuantizedAdamState(count, mu, nu, scales)


def amsgrad_state(count, mu, nu, nu_max, scales=None):
  """As :func:`adam_state`, with AMSGrad's running maximum."""
  if scales is None:
    return ScaleByAmsgradState(count, mu, nu, nu_max)
  return QuantizedAmsgradState(count, mu, nu, nu_max, scales)


# The keyword under which a wrapper passes the skip decision to ``update``
# (optax's extra-args protocol), namespaced so that it cannot collide with
# another transformation's extra argument.
STEP_IF = "jadam_step_if"


class StepIf:
  """One call's skip decision, passed to ``update`` as ``jadam_step_if=``.

  :func:`jadam.skip_nonfinite` makes a fresh one in each of its ``update``
  calls and passes it down as an extra argument; optax's wrappers (``chain``,
  ``inject_hyperparams``, ``MultiSteps``, ``partition``, ``masked``, ...)
  forward it to the transformations inside that accept extra arguments. An
  update of jadam's Adam family that receives it takes its step only where
  ``active`` is True and records the state it was given and the state it
  returned, so that the wrapper can tell which of the states it gets back
  are already right on a skipped step and need no select.

  The record lives only as long as this object, one ``update`` call; it is
  not part of the pytree, so a ``jax.jit`` boundary between the wrapper and
  the update carries ``active`` but not the record (the states then come
  back unrecorded and the wrapper selects them, which is always correct).

  Attributes:
    active: a bool scalar (traced or not): take the step where True.
  """

  __slots__ = ("active", "_honoured")

  def __init__(self, active: ArrayLike):
    self.active = active
    # id(returned state) -> (given state, returned state). Holding both keeps
    # their ids from being reused by other objects while the record is read.
    self._honoured: dict[int, tuple[Any, Any]] = {}

  def record(self, given: Any, returned: Any) -> None:
    """Note that an update given ``given`` honoured this and returned
    ``returned``."""
    self._honoured[id(returned)] = (given, returned)

  def produced(self, node: Any) -> bool:
    """True if ``node`` is a state returned by an update that honoured this."""
    entry = self._honoured.get(id(node))
    return entry is not None and entry[1] is node

  def honoured(self, new: Any, old: Any) -> bool:
    """True if an update given exactly ``old`` honoured this and returned
    exactly ``new``: then ``new`` is ``old`` bitwise where ``active`` is
    False, and needs no select."""
    entry = self._honoured.get(id(new))
    return entry is not None and entry[1] is new and entry[0] is old


def _step_if_flatten(step_if: StepIf):
  return (step_if.active,), None


def _step_if_unflatten(_, children) -> StepIf:
  return StepIf(*children)


# Only ``active`` crosses a pytree boundary (jit, vmap, tree maps); the
# record stays with the object the wrapper made.
jax.tree_util.register_pytree_node(StepIf, _step_if_flatten,
                                   _step_if_unflatten)


def _step_signal(extra_args: dict[str, Any]) -> tuple[Optional[StepIf],
                                                      Optional[jax.Array]]:
  """The skip decision among ``update``'s extra arguments, if one was passed.

  Returns:
    ``(step_if, active)``: the :class:`StepIf` passed (None when a plain bool
    was passed instead, or nothing) and the bool scalar ``active`` (None when
    nothing was passed).

  Raises:
    TypeError: if the value is not a bool scalar.
  """
  value = extra_args.get(STEP_IF)
  if value is None:
    return None, None
  step_if = value if isinstance(value, StepIf) else None
  active = jnp.asarray(value.active if step_if is not None else value)
  if active.dtype != jnp.bool_ or active.shape != ():
    raise TypeError(f"{STEP_IF} must be a bool scalar (or a "
                    f"jadam._transform.StepIf holding one), got "
                    f"{active.dtype}{list(active.shape)}.")
  return step_if, active


def check_rule(rule: _rule.AdamRule) -> None:
  _validation.check_decay("b1", rule.b1)
  _validation.check_decay("b2", rule.b2)
  _validation.check_nonnegative("eps", rule.eps)
  _validation.check_nonnegative("eps_root", rule.eps_root)
  if rule.rectify_threshold is not None:
    _validation.check_nonnegative("threshold", rule.rectify_threshold)
  if rule.numerics not in _rule.NUMERICS:
    raise ValueError(f"numerics must be one of {_rule.NUMERICS}, got "
                     f"{rule.numerics!r}.")
  if rule.numerics == "keras" and rule.nesterov:
    raise ValueError(
        "numerics='keras' reproduces keras.optimizers.Adam and AdamW, which "
        "have no Nesterov form; use nesterov=True with numerics='optax'.")
  if rule.numerics == "keras" and not (rule.bias_correction_mu
                                       and rule.bias_correction_nu):
    raise ValueError(
        "numerics='keras' always corrects both moments' bias (Keras folds "
        "the corrections into the step size); use numerics='optax' to turn "
        "bias_correction_mu or bias_correction_nu off.")
  if rule.numerics == "keras" and (rule.infinity_norm
                                   or rule.rectify_threshold is not None):
    raise ValueError(
        "numerics='keras' reproduces keras.optimizers.Adam and AdamW (and "
        "AMSGrad); AdaMax and RAdam take numerics='optax'.")


def init_moments(params: Any, storages: tuple, real: tuple[bool, ...]
                 ) -> tuple[list[Any], Optional[list[Any]]]:
  """Zero moments of ``params`` in their storage formats, one tree per
  moment, and their int8 block scales (None for leaves whose moment is not
  int8), or None if no moment's storage is int8.

  Flax boxes are metadata (:mod:`jadam._boxes`): a moment or int8 codes get
  their parameter's box, block scales a box whose axis names fit a vector
  of blocks (:func:`jadam._sharding.scales_follow_rows`).

  Args:
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``s).
    storages: per moment, its canonical storage
      (``_storage.canonical_storage``).
    real: per moment, whether it is a moment of |g|².
  """
  stored = [jax.tree.map(
      lambda p, s=storage, r=r: _storage.init_moment(p, s, real=r), params)
            for storage, r in zip(storages, real)]
  if not any(isinstance(storage, _quant.BlockwiseInt8)
             for storage in storages):
    return stored, None
  entries, treedef = jax.tree.flatten(
      params, is_leaf=lambda x: x is None or _boxes.is_box(x))
  if not entries and treedef.num_nodes == 1 and not isinstance(
      params, (dict, list, tuple, type(None))):
    # A leafless stand-in for the parameters, such as the one
    # ``optax.tree_map_params`` passes to find the parameter-shaped parts
    # of a state: the scales are not parameter-shaped, so they get a leaf of
    # their own (an empty array) rather than a copy of the stand-in.
    return stored, [jnp.zeros((0,), jnp.float32) for _ in storages]

  def scales_of(entry, storage, real):
    if entry is None:
      return None
    param = _boxes.open_box(entry)
    scales = _storage.init_scales(param, storage, real=real)
    if scales is None:
      return None
    shape = tuple(param.shape if hasattr(param, 'shape') else jnp.shape(param))
    return _boxes.box_scales(entry, scales, _sharding.scales_follow_rows(
        shape, storage.block_for(shape)))
  return stored, [treedef.unflatten([scales_of(e, storage, r)
                                     for e in entries])
                  for storage, r in zip(storages, real)]


def walk(leaf: _rule.LeafRule, updates: Any, t: Array,
         stored_trees: Sequence[Any], scale_trees: Optional[Sequence[Any]],
         formats: tuple) -> tuple[Any, list[Any], Optional[list[Any]]]:
  """The one tree walk of the package: check the gradients, and step each
  leaf's moments through the codec (:func:`jadam._storage.step_leaf`).

  Args:
    leaf: the optimizer's step on one array.
    updates: the gradients.
    t: the step number (int32, from 1); it seeds the stochastic rounding
      of narrow formats.
    stored_trees: one tree per moment, in ``leaf``'s order.
    scale_trees: their int8 block scales, or None.
    formats: per moment, its canonical storage.

  Returns:
    ``(directions, new_stored_trees, new_scale_trees)``. Where ``leaf.held``
    is True, every moment and scale comes back bitwise as it was.
  """
  _validation.check_same_tree(updates, stored_trees[0],
                              what="optimizer state")
  _validation.check_float_leaves(updates)
  grads, treedef = jax.tree.flatten(updates)
  if not grads:
    return updates, list(stored_trees), (
        None if scale_trees is None else list(scale_trees))
  columns = [treedef.flatten_up_to(tree) for tree in stored_trees]
  _validation.check_moment_kinds(updates, grads, columns, leaf.real)
  scale_columns = None
  if scale_trees is not None:
    # Matched with boxes stripped: the scales' Flax boxes carry axis names
    # of their own (a None entry is a moment that is not int8).
    plain = jax.tree.structure(_boxes.strip(updates))
    scale_columns = [plain.flatten_up_to(_boxes.strip(tree))
                     for tree in scale_trees]
  directions, new_stored, new_scales = [], [], []
  tracing = any(_compat.is_tracer(g) for g in grads)
  step = _shared_leaf_step(leaf, formats, tracing)
  inputs = [(g, tuple(column[index] for column in columns),
             None if scale_columns is None
             else tuple(column[index] for column in scale_columns))
            for index, g in enumerate(grads)]
  positions = _positions(len(inputs), t) if tracing else range(len(inputs))
  results = [step(g, stored, t, scales, position)
             for position, (g, stored, scales) in zip(positions, inputs)]
  for (g, stored, scales), (direction, moments, leaf_scales) in zip(
      inputs, results):
    if leaf.held is not None and any(
        x.dtype in (jnp.int8, jnp.uint8) for x in stored):
      # Re-encoding unchanged int8 moments need not give the same codes.
      held = functools.partial(_rule.hold, leaf.held)
      moments = tuple(map(held, moments, stored))
      leaf_scales = tuple(map(held, leaf_scales, scales))
    directions.append(direction)
    new_stored.append(moments)
    new_scales.append(leaf_scales)
  unflatten = lambda rows: [treedef.unflatten(list(column))
                            for column in zip(*rows)]
  return (treedef.unflatten(directions), unflatten(new_stored),
          None if scale_trees is None else
          [_boxes.restore(old, plain.unflatten(list(column)))
           for old, column in zip(scale_trees, zip(*new_scales))])


def _positions(n: int, t: Array) -> list[Array]:
  """The leaves' positions 0 … n−1 as values computed at run time, so that
  the compiler cannot fold them into the leaves' loops.

  Each position seeds its leaf's rounding stream. As a constant it would be
  fused into the leaf's loops and make the loops of leaves of one shape
  distinct code, which XLA then compiles once per leaf instead of once per
  shape: 400 leaves of five shapes with bfloat16 moments compiled in 20 s
  instead of 4.6 s on CPU. Picked out of one vector by a reduction, each
  position reaches the loops as a parameter. (``t >> 31`` is 0 for every
  step count, which the compiler cannot know.)
  """
  index = jax.lax.iota(jnp.uint32, n)
  vector = index + (t >> 31).astype(jnp.uint32)
  return [jnp.max(jnp.where(index == i, vector, 0)) for i in range(n)]


def _shared_leaf_step(leaf: _rule.LeafRule, formats: tuple, tracing: bool):
  """``_storage.step_leaf`` for ``leaf`` as one jitted function for the whole
  walk, so that leaves of one shape and dtype are traced and lowered once:
  the codec's int8 and stochastic-rounding code took about 50 ms of tracing
  per leaf, which dominated the compile time of trees of thousands of small
  leaves. (Under an outer ``jit`` the call is inlined by XLA; nothing
  changes in the compiled step.) The rule's per-call values (``scalars``)
  are passed as arguments (``_rule.split_scalars``).

  Called eagerly (``tracing`` False), the leaves are stepped op by op as
  before, so that an eager update rounds as optax's eager update does.
  """
  if not tracing:
    return lambda g, stored, t, scales, position: _storage.step_leaf(
        g, stored, t, leaf, stream=position, scales=scales, formats=formats)
  arrays, rebuild = _rule.split_scalars(leaf)

  @jax.jit
  def step(g, stored, t, scales, arrays, stream):
    return _storage.step_leaf(g, stored, t, rebuild(arrays), stream=stream,
                              scales=scales, formats=formats)

  # The leaf's position goes in as a traced argument (its stream), so that
  # leaves of one shape still share one trace.
  return lambda g, stored, t, scales, position: step(
      g, stored, t, scales, arrays, position)


def step_signal(extra_args: dict[str, Any], count: Array
                ) -> tuple[Optional[StepIf], Optional[Array], Array]:
  """The skip decision among ``update``'s extra arguments, and the new count.

  Returns:
    ``(step_if, held, t)``: the :class:`StepIf` passed (or None), the traced
    bool of a skipped step (None when no decision was passed), and the
    incremented ``count`` (``count`` itself where the step is skipped).
  """
  step_if, active = _step_signal(extra_args)
  t = optax.safe_increment(count)
  if active is None:
    return step_if, None, t
  return step_if, jnp.logical_not(active), jnp.where(active, t, count)


def _scale_by_rule(rule: _rule.AdamRule, mu_dtype: Any,
                   nu_dtype: Any) -> optax.GradientTransformationExtraArgs:
  """A GradientTransformationExtraArgs applying ``rule`` leaf by leaf.

  Its ``update(updates, state, params=None, **extra_args)`` reads one extra
  argument, ``jadam_step_if`` (:data:`STEP_IF`): a bool scalar, or a
  :class:`StepIf` holding one. Where it is False the step is skipped inside
  the same elementwise pass that would take it (``AdamRule.held``: each new
  moment is selected against the old one where it is computed), without a
  select over whole arrays afterwards, which would make XLA copy donated
  moments: the direction is zero and count, moments, and int8 codes and
  scales come back bitwise unchanged. Other extra arguments are ignored.
  """
  check_rule(rule)
  mu_storage = _storage.canonical_storage("mu_dtype", mu_dtype)
  nu_storage = _storage.canonical_storage("nu_dtype", nu_dtype)
  formats = (mu_storage, nu_storage, nu_storage)[:3 if rule.amsgrad else 2]
  real = (False, True, True)[:len(formats)]

  def init_fn(params):
    stored, scales = init_moments(params, formats, real)
    count = jnp.zeros([], jnp.int32)
    if scales is not None:
      scales = _rule.Moments(*scales, *([None] * (3 - len(scales))))
    if rule.amsgrad:
      return _sharding.place_scalars(amsgrad_state(count, *stored, scales),
                                     params)
    return _sharding.place_scalars(adam_state(count, *stored, scales), params)

  def update_fn(updates, state, params=None, **extra_args):
    # Extra arguments meant for other transformations of a chain are ignored.
    del params
    step_if, held, t = step_signal(extra_args, state.count)
    stored = [state.mu, state.nu] + ([state.nu_max] if rule.amsgrad else [])
    scales = getattr(state, "scales", None)
    if scales is not None:
      scales = list(scales)[:len(stored)]
    out, moments, scales = walk(
        _rule.leaf_rule(rule._replace(held=held), t), updates, t, stored,
        scales, formats)
    if scales is not None:
      scales = _rule.Moments(*scales, *([None] * (3 - len(scales))))
    if rule.amsgrad:
      new_state = amsgrad_state(t, *moments, scales)
    else:
      new_state = adam_state(t, *moments, scales)
    if step_if is not None:
      step_if.record(state, new_state)
    return out, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_adam(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: Optional[Any] = None,
    *,
    nu_dtype: Optional[Any] = None,
    nesterov: bool = False,
    cautious: bool = False,
    numerics: str = "optax",
) -> optax.GradientTransformationExtraArgs:
  """Rescale gradients by Adam's bias-corrected moments.

  The transformation returns ``m̂_t / (√(v̂_t + eps_root) + eps)``; chain it
  with ``optax.scale_by_learning_rate`` (or use :func:`jadam.adam`) to get the
  parameter update.

  Args:
    b1: decay of the first moment, in [0, 1).
    b2: decay of the second moment, in [0, 1).
    eps: added to the denominator, >= 0.
    eps_root: added to v̂ inside the square root, >= 0.
    mu_dtype: storage dtype of the first moment (None: the parameter's).
    nu_dtype: storage dtype of the second moment (None: the parameter's).
      Arithmetic always runs in float32 or wider whatever the storage.
    nesterov: use Nesterov momentum (NAdam, Dozat 2016).
    cautious: zero the components whose sign disagrees with the current
      gradient and rescale the rest by the fraction kept, per parameter array
      (Cautious Adam, Liang et al. 2024).
    numerics: ``"optax"`` (default) computes Algorithm 1 as written, equal to
      ``optax.adam``; ``"keras"`` computes it as ``keras.optimizers.Adam``
      does (ε added to √v_t, bias correction folded into the step size), so
      that models ported from Keras train identically. Note Keras's default
      ε is 1e-7.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`ScaleByAdamState`. Its ``update`` accepts the extra argument
    ``jadam_step_if``, a bool scalar: where it is False the step is skipped
    (zero direction, count and moments bitwise unchanged) inside the same
    fused pass; :func:`jadam.skip_nonfinite` passes it. Other extra
    arguments, meant for other members of a chain, are ignored.

  Raises:
    ValueError: at construction, naming the argument that is out of range.

  Example:
    >>> import jax.numpy as jnp, optax, jadam
    >>> tx = optax.chain(jadam.scale_by_adam(), optax.scale_by_learning_rate(1e-3))
    >>> params = {"w": jnp.ones(3)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.array([1., -2., 0.])}, state)
    >>> updates["w"]
    Array([-0.001,  0.001,  0.   ], dtype=float32)

  References:
    Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.
  """
  return _scale_by_rule(
      _rule.AdamRule(b1, b2, eps, eps_root, nesterov=nesterov,
                     cautious=cautious, numerics=numerics),
      mu_dtype, nu_dtype)


def scale_by_amsgrad(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: Optional[Any] = None,
    bias_correction_mu: bool = True,
    bias_correction_nu: bool = True,
    *,
    nu_dtype: Optional[Any] = None,
    cautious: bool = False,
    numerics: str = "optax",
) -> optax.GradientTransformationExtraArgs:
  """Adam dividing by the running maximum of the bias-corrected v̂.

  Args:
    b1, b2, eps, eps_root, mu_dtype, nu_dtype, cautious: as in
      :func:`scale_by_adam`; ``nu_dtype`` also sets the storage of the
      running maximum.
    bias_correction_mu: divide m_t by 1 − β1^t (as optax's argument).
    bias_correction_nu: divide v_t by 1 − β2^t before the running maximum.
    numerics: as in :func:`scale_by_adam`; with ``"keras"`` the running
      maximum is of the uncorrected v_t, as in
      ``keras.optimizers.Adam(amsgrad=True)``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`ScaleByAmsgradState`; ``update`` accepts ``jadam_step_if`` as in
    :func:`scale_by_adam`.

  Example:
    >>> import jadam
    >>> tx = jadam.scale_by_amsgrad(b2=0.99)

  References:
    Reddi, Kale & Kumar, "On the Convergence of Adam and Beyond", ICLR 2018.
  """
  return _scale_by_rule(
      _rule.AdamRule(b1, b2, eps, eps_root, amsgrad=True, cautious=cautious,
                     numerics=numerics, bias_correction_mu=bias_correction_mu,
                     bias_correction_nu=bias_correction_nu),
      mu_dtype, nu_dtype)


def scale_by_adamax(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    *,
    mu_dtype: Optional[Any] = None,
    nu_dtype: Optional[Any] = None,
    cautious: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """AdaMax: Adam with the infinity norm u_t = max(β2·u_{t-1}, |g_t| + ε).

  Args:
    b1, b2, eps, mu_dtype, nu_dtype, cautious: as in :func:`scale_by_adam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`ScaleByAdamState` whose ``nu`` holds u; ``update`` accepts
    ``jadam_step_if`` as in :func:`scale_by_adam`.

  Example:
    >>> import jadam
    >>> tx = jadam.scale_by_adamax()

  References:
    Kingma & Ba (2015), Section 7.1 and Algorithm 2.
  """
  return _scale_by_rule(
      _rule.AdamRule(b1, b2, eps, infinity_norm=True, cautious=cautious),
      mu_dtype, nu_dtype)


def scale_by_radam(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    threshold: ArrayLike = 5.0,
    *,
    nesterov: bool = False,
    mu_dtype: Optional[Any] = None,
    nu_dtype: Optional[Any] = None,
    cautious: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """RAdam: Adam with the variance of the adaptive step rectified.

  Args:
    b1, b2, eps, eps_root, nesterov, mu_dtype, nu_dtype, cautious: as in
      :func:`scale_by_adam`.
    threshold: while the SMA length ρ_t is below it, take momentum steps.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`ScaleByAdamState`; ``update`` accepts ``jadam_step_if`` as in
    :func:`scale_by_adam`.

  Example:
    >>> import jadam
    >>> tx = jadam.scale_by_radam(threshold=5.0)

  References:
    Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond",
    ICLR 2020.
  """
  return _scale_by_rule(
      _rule.AdamRule(b1, b2, eps, eps_root, nesterov=nesterov,
                     rectify_threshold=threshold, cautious=cautious),
      mu_dtype, nu_dtype)

"""The numerics doctor: per-tensor measurements of a training step, and
findings that name the tensor, the problem and the fix.

``doctor`` wraps a whole optimizer. Every ``every`` steps, inside one
``lax.cond`` (other steps only count), it measures each parameter tensor
(each ``FlatView`` segment, under its key path): the share of its update
lost to the parameter dtype's rounding, of coordinates whose √v̂ is below
ε, the round-trip error of compressed moments, the update-to-weight ratio,
the lag of v̂ behind g², zero gradients and embedding rows not seen. The
numbers only a transformation inside knows (v̂, ε, the moment before it is
stored, the update before stochastic rounding) come back through a
``_probe.Probe``. A step that a skipping wrapper inside drops is measured
too, for where its NaN or Inf came from. ``diagnose`` turns the kept
measurements into ``Finding``s; ``doctor_log`` into a flat dict.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jadam import _boxes
from jadam import _health
from jadam import _probe
from jadam._formats import floats
from jadam.sharding import _placement

Array = jax.Array

# Tensors above this many coordinates are measured on every STRIDE-th one
# (a fixed prime stride, so it meets every residue of a row or a block);
# the non-finite check reads them all. See docs/doctor.md for the error.
SAMPLE_ABOVE = 1 << 14
STRIDE = 17

# g²/v̂ histogram: bins split at 2^-8, 2^-6, ..., 2^8 (10 bins, no sort).
LAG_EDGES = tuple(2.0 ** k for k in range(-8, 9, 2))

# What is measured per tensor; a NaN where it does not apply.
MEASUREMENTS = ("rounded_away", "eps_dominated", "storage_error",
                "update_ratio", "lag_max", "zero_grad", "rows_unseen")
# Measurements that become findings when over their threshold for
# ``Thresholds.persist`` measurements in a row (the non-finite origin is
# kept apart: one step is enough).
CHECKED = ("rounded_away", "eps_dominated", "storage_error")


@dataclasses.dataclass(frozen=True)
class Thresholds:
  """When a measurement becomes a finding (defaults in docs/doctor.md).

  Attributes:
    rounded_away: share of a tensor's moving coordinates whose update the
      parameter dtype rounds away.
    eps_dominated: share of a tensor's coordinates (with v̂ > 0) where
      √v̂ < ``eps_multiple``·ε, so ε at least halves the step.
    eps_multiple: the multiple of ε above.
    storage_error: mean relative round-trip error of a compressed moment
      (each coordinate's error capped at 1).
    persist: measurements in a row a condition must hold to be a finding.
    embedding_rows: 2-D tensors with at least this many rows, and at
      least 8 times as many rows as columns, track which rows got no
      gradient since the last measurement (0: none).
  """

  rounded_away: float = 0.25
  eps_dominated: float = 0.5
  eps_multiple: float = 1.0
  storage_error: float = 0.25
  persist: int = 3
  embedding_rows: int = 1024


class _Segment(NamedTuple):
  """One parameter tensor: its path, the buffer (``update``'s leaf) it is
  in, where, its shape and its dtype's name."""

  path: str
  buffer: str
  start: int
  shape: tuple[int, ...]
  dtype: str = ""

  @property
  def size(self) -> int:
    return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class DoctorMeasurements:
  """The doctor's per-tensor numbers, one entry per ``paths`` element.

  Attributes:
    paths: the tensors' key paths (static: part of the tree structure).
    values: measurement name -> float32 ``[n]`` (NaN: not measured or does
      not apply), as of the last measuring step.
    lag_hist: int32 ``[n, 10]``, counts of g²/v̂ per ``LAG_EDGES`` bin.
    nonfinite_steps: int32 ``[n]``, steps whose gradient held NaN or Inf
      in this tensor (all steps the doctor saw skipped, or measured).
    nonfinite_last: int32 ``[n]``, the last such step (0: never).
    held: int32 ``[len(CHECKED), n]``, measurements in a row over the
      threshold.
    since: int32 ``[len(CHECKED), n]``, the step the current run began.
    rows_seen: per embedding-like tensor (``row_paths``), bool per row:
      got a nonzero gradient since the last measurement.
    row_paths: the paths of those tensors (static).
    thresholds: the doctor's ``Thresholds`` (static).
    dtypes: the tensors' dtype names (static), for the fixes.
    sizes: the tensors' sizes (static), to weigh them in group totals.
  """

  paths: tuple[str, ...]
  values: dict
  lag_hist: Array
  nonfinite_steps: Array
  nonfinite_last: Array
  held: Array
  since: Array
  rows_seen: tuple
  row_paths: tuple[str, ...]
  thresholds: Thresholds
  dtypes: tuple[str, ...] = ()
  sizes: tuple[int, ...] = ()


jax.tree_util.register_dataclass(
    DoctorMeasurements,
    data_fields=["values", "lag_hist", "nonfinite_steps", "nonfinite_last",
                 "held", "since", "rows_seen"],
    meta_fields=["paths", "row_paths", "thresholds", "dtypes", "sizes"])


class DoctorState(NamedTuple):
  """State of ``doctor``.

  Attributes:
    inner_state: the wrapped state.
    count: update calls (int32, saturating).
    measured_at: the step of the last measurement (0: none yet).
    measurements: ``DoctorMeasurements``.
  """

  inner_state: Any
  count: Array
  measured_at: Array
  measurements: DoctorMeasurements


def _layout(params: Any, view: Any) -> list[_Segment]:
  """The tensors the doctor measures, in the parameters' leaf order."""
  plain = _boxes.strip(params)
  if view is not None:
    buffers = _leaves_by_path(plain)
    return [_Segment(path, key, start, tuple(shape),
                     np.dtype(buffers[key].dtype).name)
            for path, key, start, shape in view.segments()]
  return [_Segment(path, path, 0, tuple(np.shape(leaf)),
                   np.dtype(getattr(leaf, "dtype", np.float32)).name)
          for path, leaf in zip(_boxes.leaf_paths(plain),
                                jax.tree.leaves(plain))]


def _embedding_like(segment: _Segment, thresholds: Thresholds) -> bool:
  """A lookup table: 2-D, many rows, rows much shorter than the table is
  tall (an MLP's down projection, 4 times taller than wide, is not)."""
  if thresholds.embedding_rows <= 0 or len(segment.shape) != 2:
    return False
  rows, width = segment.shape
  return rows >= thresholds.embedding_rows and rows >= 8 * width


def _slice(buffer: Array, segment: _Segment) -> Array:
  """The tensor ``segment`` of ``buffer`` (a static slice, reshaped)."""
  if tuple(buffer.shape) == segment.shape:
    return buffer
  flat = buffer.reshape(-1)
  return flat[segment.start:segment.start + segment.size].reshape(
      segment.shape)


def _reductions(columns: dict[str, tuple[Array, str]], like: Array,
                axes: Optional[tuple]) -> dict[str, Array]:
  """Each column's sum or max, completed over ``axes``' devices.
  ``columns``: name -> (elementwise array, "sum" or "max"). One reduction
  per column, its elementwise work fused into it: XLA:CPU runs a variadic
  reduce of twenty outputs several times slower than twenty reductions."""
  out = {}
  for name, (x, kind) in columns.items():
    if kind == "sum":
      out[name] = _health._across(jnp.sum(x), like, axes, jax.lax.psum)
    else:
      out[name] = _health._across(jnp.max(x), like, axes, jax.lax.pmax)
  return out


def _share(hits: Array, of: Array) -> Array:
  """``hits / of`` as float32; NaN where ``of`` is 0."""
  of = of.astype(jnp.float32)
  return jnp.where(of > 0, hits.astype(jnp.float32) / jnp.maximum(of, 1),
                   jnp.nan)


def _tensor_numbers(g: Array, u: Array, p: Array, inside: Optional[dict],
                    rounding: Optional[dict], thresholds: Thresholds,
                    axes: Optional[tuple]) -> dict[str, Array]:
  """One tensor's measurements (``MEASUREMENTS`` but rows, and
  ``lag_hist``) from its gradient, update and parameters, and what the
  transformations inside handed the probe (elementwise, or None)."""
  count = lambda x: x.astype(jnp.int32)
  columns = {}
  if rounding is not None:
    # Stochastic rounding: lost in expectation only where θ + u is θ in
    # float32 already (its random bits cover the rest of the gap).
    before = rounding["u"].astype(jnp.float32)
    p32 = rounding["p"].astype(jnp.float32)
    moving, lost = before != 0, (p32 + before) == p32
  else:
    # What optax.apply_updates makes of it in the parameter dtype.
    moving, lost = u != 0, (p + u).astype(p.dtype) == p
  columns["moving"] = count(moving), "sum"
  columns["lost"] = count(moving & lost), "sum"
  columns["u2"] = jnp.square(u), "sum"
  columns["p2"] = jnp.square(p.astype(u.dtype)), "sum"
  columns["zero"] = count(g == 0), "sum"
  if inside is not None and "v_hat" in inside:
    v_hat, eps, g_in = inside["v_hat"], inside["eps"], inside["g"]
    valid = v_hat > 0
    safe = jnp.where(valid, v_hat, 1)
    columns["valid"] = count(valid), "sum"
    columns["eps_dominated"] = count(
        valid & (jnp.sqrt(safe) < thresholds.eps_multiple * eps)), "sum"
    lag = jnp.where(valid, jnp.square(jnp.abs(g_in)) / safe, 0)
    columns["lag_max"] = lag.astype(jnp.float32), "max"
    index = sum(count(lag >= edge) for edge in LAG_EDGES)
    for b in range(len(LAG_EDGES) + 1):
      columns[f"lag{b}"] = count(valid & (index == b)), "sum"
  for k, (value, trip) in enumerate((inside or {}).get("stored", ())):
    nonzero = value != 0
    relative = jnp.minimum(
        jnp.abs(trip - value) / jnp.where(nonzero, jnp.abs(value), 1), 1)
    columns[f"nonzero{k}"] = count(nonzero), "sum"
    columns[f"error{k}"] = (jnp.where(nonzero, relative, 0).astype(
        jnp.float32), "sum")
  r = _reductions(columns, u, axes)
  size = _health._across(jnp.asarray(g.size, jnp.float32), g, axes,
                         jax.lax.psum)
  u_norm, p_norm = jnp.sqrt(r["u2"]), jnp.sqrt(r["p2"])
  out = {
      "rounded_away": _share(r["lost"], r["moving"]),
      "update_ratio": jnp.where(p_norm > 0, u_norm / jnp.where(
          p_norm > 0, p_norm, 1), jnp.nan),
      "zero_grad": _share(r["zero"], size),
  }
  if "valid" in r:
    out["eps_dominated"] = _share(r["eps_dominated"], r["valid"])
    out["lag_max"] = jnp.where(r["valid"] > 0, r["lag_max"], jnp.nan)
    out["lag_hist"] = jnp.stack([r[f"lag{b}"]
                                 for b in range(len(LAG_EDGES) + 1)])
  errors = [_share(r[f"error{k}"], r[f"nonzero{k}"])
            for k in range(len((inside or {}).get("stored", ())))]
  if errors:
    out["storage_error"] = jnp.nanmax(jnp.stack(errors))
  return out


def doctor(
    inner: optax.GradientTransformation,
    every: int = 10,
    thresholds: Optional[Thresholds] = None,
    *,
    view: Any = None,
    axis_name: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Measure the numerics of each parameter tensor every ``every`` steps.

  Wrap the whole optimizer (outermost, as ``with_telemetry``): the update
  it sees is the one ``optax.apply_updates`` applies, so it can predict
  ``p + u`` in the parameter dtype. ``update`` needs ``params``. On steps
  ``every``, ``2·every``, ... one ``lax.cond`` measures (see
  ``MEASUREMENTS`` and docs/doctor.md); other steps pay an integer compare
  (and, for embedding-like tensors, one pass over their gradient rows).
  Under ``jax.vmap`` the ``cond`` becomes a select: both branches run on
  every step. A step dropped by ``skip_nonfinite`` or ``skip_spikes``
  inside is measured for where its NaN or Inf came from.

  ε-dominance, g²/v̂ and storage error come from jadam's transformations
  inside (NaN for others, such as optax's own); the rounded-away share
  under ``jadam.stochastic_rounding`` is what is lost in expectation.

  Args:
    inner: the optimizer, whole.
    every: a positive int, the measuring period.
    thresholds: ``Thresholds`` (the defaults: ``Thresholds()``); fixed at
      construction, because findings need measurements in a row.
    view: the ``jadam.FlatView`` when ``inner`` runs on its buffers: the
      doctor then measures each tensor inside them under its own path.
    axis_name: inside ``jax.shard_map``, the mesh axes the trees are split
      over (as for ``with_telemetry``); required there.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``DoctorState``.

  Example:
    >>> import jax.numpy as jnp, jadam
    >>> opt = jadam.doctor(jadam.adam(1e-3, eps=1e-3), every=1)
    >>> params = {"w": jnp.ones(4)}
    >>> state = opt.init(params)
    >>> for _ in range(3):
    ...   _, state = opt.update({"w": jnp.full(4, 1e-5)}, state, params)
    >>> [f.measurement for f in jadam.diagnose(state)]
    ['eps_dominated']

  References:
    Zamirai et al., "Revisiting BFloat16 Training", arXiv:2010.06192;
    Wortsman et al., "Small-scale proxies for large-scale Transformer
    training instabilities", arXiv:2309.14322.
  """
  if isinstance(every, bool) or not isinstance(every, int) or every < 1:
    raise ValueError(f"every must be a positive integer, got {every!r}.")
  thresholds = thresholds or Thresholds()
  if not isinstance(thresholds, Thresholds):
    raise TypeError("thresholds must be a jadam.Thresholds, got "
                    f"{type(thresholds).__name__}.")
  inner = optax.with_extra_args_support(inner)
  axes = _health._axes(axis_name)
  if axes and view is not None:
    raise ValueError("doctor(view=..., axis_name=...): a FlatView's "
                     "buffers are not split along tensors, so per-tensor "
                     "numbers cannot be completed across devices; measure "
                     "the tree path under shard_map.")

  def init_fn(params):
    segments = _layout(params, view)
    n = len(segments)
    nan = lambda: jnp.full([n], jnp.nan, jnp.float32)
    zeros = lambda shape: jnp.zeros(shape, jnp.int32)
    rows = [s for s in segments if _embedding_like(s, thresholds)]
    measurements = DoctorMeasurements(
        paths=tuple(s.path for s in segments),
        values={name: nan() for name in MEASUREMENTS},
        lag_hist=zeros([n, len(LAG_EDGES) + 1]),
        nonfinite_steps=zeros([n]), nonfinite_last=zeros([n]),
        held=zeros([len(CHECKED), n]), since=zeros([len(CHECKED), n]),
        rows_seen=tuple(jnp.zeros([s.shape[0]], jnp.bool_) for s in rows),
        row_paths=tuple(s.path for s in rows), thresholds=thresholds,
        dtypes=tuple(s.dtype for s in segments),
        sizes=tuple(s.size for s in segments))
    return _placement.place_scalars(DoctorState(
        inner.init(params), zeros([]), zeros([]), measurements), params)

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
          "jadam.doctor needs the parameters, to predict what "
          "optax.apply_updates makes of the update: call "
          "update(grads, state, params).")
    _health._check_axis_name("doctor", axes)
    _health.require_vma("doctor(axis_name=...)", axes)
    segments = _layout(params, view)
    old = state.measurements
    if tuple(s.path for s in segments) != old.paths:
      raise ValueError("the doctor's state was made for other parameters "
                       f"({len(old.paths)} tensors, this update has "
                       f"{len(segments)}); build it with init(params).")
    count = optax.safe_increment(state.count)
    measure = count % every == 0
    by_buffer: dict[str, list[int]] = {}
    for i, s in enumerate(segments):
      by_buffer.setdefault(s.buffer, []).append(i)

    def wants(path, shape):
      members = by_buffer.get(path)
      # Another tree (a ZeRO-1 shard, say) is not the doctor's.
      return bool(members) and all(
          segments[i].start + segments[i].size <= math.prod(shape)
          for i in members)

    grads = _leaves_by_path(updates)
    weights = _leaves_by_path(params)
    piece = lambda tree, s: _slice(tree[s.buffer], s).astype(
        floats.compute_dtype(tree[s.buffer].dtype))
    # x − x is NaN exactly where x is not finite: one float sum per tensor
    # (as all_finite), where a count of isfinite made XLA:CPU write an int32
    # copy of each tensor first.
    nonfinite_of = lambda: jnp.stack([jnp.isnan(_health._across(
        jnp.sum(piece(grads, s) - piece(grads, s)), grads[s.buffer], axes,
        jax.lax.psum)) for s in segments])

    def measured():
      # The step replayed with a probe: the step that trains carries none,
      # so its fused loops are the plain optimizer's, and this branch reads
      # only what the step reads (never what it overwrites in place).
      probe = _probe.Probe(wants)
      replayed, _ = inner.update(updates, state.inner_state, params,
                                 **{**extra_args, _probe.PROBE: probe})
      outs = _leaves_by_path(replayed)
      values = {name: [] for name in MEASUREMENTS}
      hist = []
      for s in segments:
        found = {kind: probe.results.get((kind, s.buffer))
                 for kind in ("engine", "rounding")}
        sample = ((lambda x: x.reshape(-1)[::STRIDE])
                  if s.size > SAMPLE_ABOVE else (lambda x: x))
        cut = lambda arrays: None if arrays is None else jax.tree.map(
            lambda x: x if jnp.ndim(x) == 0 else sample(_slice(x, s)),
            arrays)
        inputs = (sample(piece(grads, s)), sample(piece(outs, s)),
                  sample(_slice(weights[s.buffer], s)), cut(found["engine"]),
                  cut(found["rounding"]))
        # Gathered (or computed) once, apart from the reductions: each
        # reduction reading the strided elements itself would touch every
        # cache line of the tensor again, and XLA:CPU runs a reduction fused
        # into a producer's loop markedly slower.
        inputs = jax.lax.optimization_barrier(inputs)
        numbers = _tensor_numbers(*inputs, thresholds, axes)
        if s.path in old.row_paths:
          seen = rows_seen[old.row_paths.index(s.path)]
          numbers["rows_unseen"] = 1 - jnp.mean(seen.astype(jnp.float32))
        for name in MEASUREMENTS:
          values[name].append(jnp.asarray(
              numbers.get(name, jnp.nan), jnp.float32))
        hist.append(numbers.get("lag_hist", jnp.zeros(
            [len(LAG_EDGES) + 1], jnp.int32)).astype(jnp.int32))
      return ({k: jnp.stack(v) for k, v in values.items()}, jnp.stack(hist),
              nonfinite_of())

    def kept():
      return (old.values, old.lag_hist,
              jnp.zeros([len(segments)], jnp.bool_))

    rows_seen = tuple(
        seen | jnp.any(piece(grads, segments[old.paths.index(path)]) != 0,
                       axis=1)
        for seen, path in zip(old.rows_seen, old.row_paths))
    if segments:
      values, hist, nonfinite = jax.lax.cond(measure, measured, kept)
      # The step that trains waits for the measurement, so that XLA may
      # overwrite donated buffers in place without copying them first.
      (values, hist, nonfinite), (updates, inner_state, params) = (
          jax.lax.optimization_barrier(((values, hist, nonfinite),
                                        (updates, state.inner_state,
                                         params))))
    else:
      (values, hist, nonfinite), inner_state = kept(), state.inner_state
    skipped_before = _health.skipped_steps(inner_state)
    new_updates, new_inner = inner.update(updates, inner_state, params,
                                          **extra_args)
    if segments:
      # A step a skipping wrapper dropped: where its NaN or Inf came from.
      skipped = ((_health.skipped_steps(new_inner) != skipped_before)
                 & ~measure)
      nonfinite = nonfinite | jax.lax.cond(
          skipped, nonfinite_of, lambda: jnp.zeros_like(nonfinite))
    over = jnp.stack([values[name] > getattr(thresholds, name)
                      for name in CHECKED]) if segments else old.held > 0
    held = jnp.where(measure, jnp.where(over, old.held + 1, 0), old.held)
    since = jnp.where(measure, jnp.where(
        over, jnp.where(old.held > 0, old.since, count), 0), old.since)
    rows_seen = tuple(jnp.where(measure, jnp.zeros_like(seen), seen)
                      for seen in rows_seen)
    measurements = dataclasses.replace(
        old, values=values, lag_hist=hist, held=held, since=since,
        nonfinite_steps=old.nonfinite_steps + nonfinite.astype(jnp.int32),
        nonfinite_last=jnp.where(nonfinite, count, old.nonfinite_last),
        rows_seen=rows_seen)
    return new_updates, DoctorState(
        new_inner, count, jnp.where(measure, count, state.measured_at),
        measurements)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _leaves_by_path(tree: Any) -> dict[str, Array]:
  plain = _boxes.strip(tree)
  return dict(zip(_boxes.leaf_paths(plain), jax.tree.leaves(plain)))


# Findings ------------------------------------------------------------------

FIXES = {
    "rounded_away": (
        "updates of this tensor are smaller than half a step of its dtype "
        "and are rounded away: add jadam.stochastic_rounding() last in the "
        "chain, or keep float32 master weights"),
    # The same measurement on float32 (or wider) parameters: no wider
    # format helps, and a learning rate decayed to ~0 makes it harmless.
    "rounded_away_wide": (
        "updates of this float32 tensor are below half its spacing: "
        "harmless at the end of a schedule that decays to zero; otherwise "
        "the learning rate is too small for this tensor's scale"),
    "eps_dominated": (
        "√v̂ is below ε for most coordinates, so ε, not the gradient, sets "
        "the step: lower eps (below this tensor's gradient scale), or "
        "rescale the loss"),
    "storage_error": (
        "the compressed moment loses most of this tensor's values (an "
        "outlier per block): keep its moments in a wider format "
        "(float32 or bfloat16 moments, or a smaller int8 block)"),
    "nonfinite": (
        "the gradient of this tensor held NaN or Inf: look at the ops that "
        "produce it (a log or division near 0, an overflow in float16); "
        "skip_nonfinite kept the optimizer state"),
}


@dataclasses.dataclass(frozen=True)
class Finding:
  """One problem the doctor found.

  Attributes:
    path: the tensor's key path.
    measurement: which (``"rounded_away"``, ``"eps_dominated"``,
      ``"storage_error"``, ``"nonfinite"``).
    value: its last value (for ``nonfinite``, the number of steps).
    threshold: the threshold it is over.
    since: the first step of the run of measurements over it (the first
      non-finite step seen is not kept: for ``nonfinite``, the last).
    until: the last measured step it held (the last non-finite step).
    fix: what to do.
    group: the parameter group of the tensor, if groups were given.
  """

  path: str
  measurement: str
  value: float
  threshold: float
  since: int
  until: int
  fix: str
  group: Optional[str] = None

  def __str__(self) -> str:
    where = self.path + (f" [{self.group}]" if self.group else "")
    if self.measurement == "nonfinite":
      return (f"{where}: non-finite gradient on {int(self.value)} step(s), "
              f"last at step {self.until}. Fix: {self.fix}.")
    return (f"{where}: {self.measurement} = {self.value:.3g} > "
            f"{self.threshold:g} at steps {self.since}–{self.until}. "
            f"Fix: {self.fix}.")


class Diagnosis(list):
  """A list of ``Finding``; ``str`` of it is a table, one row per finding,
  then each measurement's fix once."""

  def __str__(self) -> str:
    if not self:
      return "jadam.doctor: no findings."
    header = ("tensor", "group", "measurement", "value", "threshold",
              "steps")
    rows = [(f.path, f.group or "", f.measurement,
             f"{f.value:.0f} steps" if f.measurement == "nonfinite"
             else f"{f.value:.3g}",
             "any" if f.measurement == "nonfinite" else f"{f.threshold:g}",
             f"last {f.until}" if f.measurement == "nonfinite"
             else f"{f.since}–{f.until}") for f in self]
    if not any(f.group for f in self):
      header, rows = header[:1] + header[2:], [r[:1] + r[2:] for r in rows]
    widths = [max(len(str(x)) for x in column)
              for column in zip(header, *rows)]
    line = lambda r: "  " + "  ".join(
        str(x).ljust(w) for x, w in zip(r, widths)).rstrip()
    out = [f"jadam.doctor: {len(self)} finding"
           f"{'' if len(self) == 1 else 's'}", line(header)]
    out += [line(r) for r in rows]
    out.append("fixes:")
    for name, fix in dict.fromkeys((f.measurement, f.fix) for f in self):
      out.append(f"  {name}: {fix}.")
    return "\n".join(out)


def _doctor_state(state: Any) -> DoctorState:
  found = _health._find(state, DoctorState)
  if not found:
    raise ValueError("This optimizer state holds no doctor; build the "
                     "optimizer as jadam.doctor(optimizer).")
  return found[0]


def _group_of(paths: Sequence[str], groups: Any) -> list[Optional[str]]:
  """Each path's group name, by the groups' own matching (a callable
  ``match`` would need the tensor's struct, which the state does not keep:
  such groups are not named)."""
  if groups is None:
    return [None] * len(paths)
  from jadam import _groups  # pylint: disable=g-import-not-at-top
  layout = _groups.as_layout(groups)
  return [layout.name(next(
      (k for k, group in enumerate(layout.groups)
       if isinstance(group.match, str) and group.matches(path, None)),
      len(layout.groups))) for path in paths]


def diagnose(state: Any, groups: Any = None) -> Diagnosis:
  """The doctor's findings in ``state``, as data.

  A measurement over its threshold on ``Thresholds.persist`` measurements
  in a row is a finding, as is any step whose gradient held NaN or Inf
  (with the tensors it came from). Not jittable: it reads the numbers.

  Args:
    state: an optax state holding a ``DoctorState`` (anywhere inside; for
      Flax NNX, ``optimizer.opt_state``).
    groups: the optimizer's ``jadam.Group`` list, to name each tensor's
      group (groups whose ``match`` is a callable are not named).

  Returns:
    A ``Diagnosis`` (a list of ``Finding``, empty when healthy); ``print``
    it for a table.
  """
  node = _doctor_state(state)
  m = node.measurements
  thresholds = m.thresholds
  names = _group_of(m.paths, groups)
  values = {k: np.asarray(v) for k, v in m.values.items()}
  held, since = np.asarray(m.held), np.asarray(m.since)
  measured_at = int(np.asarray(node.measured_at))
  steps = np.asarray(m.nonfinite_steps)
  last = np.asarray(m.nonfinite_last)
  out = Diagnosis()
  for i, path in enumerate(m.paths):
    if steps[i] > 0:
      out.append(Finding(path, "nonfinite", float(steps[i]), 0.0,
                         int(last[i]), int(last[i]), FIXES["nonfinite"],
                         names[i]))
    for k, name in enumerate(CHECKED):
      if held[k, i] >= thresholds.persist:
        fix = FIXES[name]
        if name == "rounded_away" and m.dtypes and np.dtype(
            m.dtypes[i]).itemsize >= 4:
          fix = FIXES["rounded_away_wide"]
        out.append(Finding(path, name, float(values[name][i]),
                           getattr(thresholds, name), int(since[k, i]),
                           measured_at, fix, names[i]))
  return out


def doctor_log(state: Any, groups: Any = None) -> dict[str, float]:
  """The last measurements as a flat dict for any logger.

  Keys are ``doctor/<path>/<measurement>`` (stable across steps), plus
  ``doctor/<path>/nonfinite_steps`` and ``doctor/step``. NaN where a
  measurement does not apply. With ``groups`` (the optimizer's
  ``jadam.Group`` list), also ``doctor/group/<name>/<measurement>``: the
  group's tensors' values weighted by their sizes (the largest for
  ``lag_max``), over the tensors where it applies.

  Args:
    state: an optax state holding a ``DoctorState``.
    groups: optional, the parameter groups to total over.

  Returns:
    A dict of Python floats.
  """
  node = _doctor_state(state)
  m = node.measurements
  out = {"doctor/step": float(np.asarray(node.measured_at))}
  values = {k: np.asarray(v) for k, v in m.values.items()}
  steps = np.asarray(m.nonfinite_steps)
  for i, path in enumerate(m.paths):
    for name in MEASUREMENTS:
      out[f"doctor/{path}/{name}"] = float(values[name][i])
    out[f"doctor/{path}/nonfinite_steps"] = float(steps[i])
  if groups is not None:
    names = np.array(_group_of(m.paths, groups))
    sizes = np.asarray(m.sizes or [1] * len(m.paths), np.float64)
    for group in dict.fromkeys(names.tolist()):
      member = names == group
      for name in MEASUREMENTS:
        v = values[name][member].astype(np.float64)
        w = sizes[member][~np.isnan(v)]
        v = v[~np.isnan(v)]
        if not v.size:
          total = float("nan")
        elif name == "lag_max":
          total = float(v.max())
        else:
          total = float((v * w).sum() / w.sum())
        out[f"doctor/group/{group}/{name}"] = total
      out[f"doctor/group/{group}/nonfinite_steps"] = float(
          steps[member].sum())
  return out

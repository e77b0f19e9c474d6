"""The measuring request: made by ``jadam.doctor``, answered inside.

Some numbers exist only inside a transformation: the float32 moment before
it is stored, v̂ and ε, the update before stochastic rounding. The doctor
passes a ``Probe`` down as the extra ``update`` argument ``jadam_probe``
(optax's extra-args protocol, as ``_skip`` does for the skip); a
transformation that holds such numbers hands them, elementwise, to
``Probe.collect``; the doctor reduces them with its own, in one pass per
tensor. The doctor passes a probe only
to the replay of the step it runs inside its measuring branch, so the step
that trains never carries one. The probe is fresh per call: nothing is kept
between calls or shared between traces.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax

Array = jax.Array

PROBE = "jadam_probe"


class Probe:
  """One ``update`` call's request for inside measurements.

  Attributes:
    wants: ``wants(path, shape)``: whether the doctor measures the leaf at
      ``path`` of that shape (a tree it does not know, such as a ZeRO-1
      shard, is left alone).
    results: ``(kind, path)`` -> the leaf's elementwise arrays.
  """

  __slots__ = ("wants", "results")

  def __init__(self, wants: Callable[[str, tuple], bool]):
    self.wants = wants
    self.results: dict[tuple[str, str], Any] = {}

  def collect(self, kind: str, paths: Sequence[str],
              shapes: Sequence[tuple],
              compute: Callable[[int], dict]) -> None:
    """Keep ``compute(i)`` (a dict of elementwise arrays of leaf ``i``)
    for every leaf the doctor measures."""
    for i, (path, shape) in enumerate(zip(paths, shapes)):
      if self.wants(path, tuple(shape)):
        self.results[(kind, path)] = compute(i)


def read(extra_args: dict[str, Any]) -> Optional[Probe]:
  """The ``Probe`` among ``update``'s extra arguments, or None."""
  probe = extra_args.get(PROBE)
  if probe is not None and not isinstance(probe, Probe):
    raise TypeError(f"{PROBE} must be a jadam._probe.Probe, got "
                    f"{type(probe).__name__}.")
  return probe

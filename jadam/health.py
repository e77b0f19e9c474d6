"""Non-finite step skipping and gradient-health telemetry.

:func:`skip_nonfinite` wraps any optimizer so that a step with a non-finite
gradient changes nothing; :func:`with_telemetry` records gradient and update
statistics in the state, read with :func:`stats`. See ``docs/reliability.md``.
"""

from jadam._health import HealthStats
from jadam._health import SkipNonfiniteState
from jadam._health import TelemetryState
from jadam._health import skip_nonfinite
from jadam._health import stats
from jadam._health import with_telemetry

__all__ = ["HealthStats", "SkipNonfiniteState", "TelemetryState",
           "skip_nonfinite", "stats", "with_telemetry"]

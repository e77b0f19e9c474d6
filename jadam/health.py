"""Old home of the health wrappers; they are at the top level now
(``jadam.skip_nonfinite``, ``jadam.with_telemetry``, ``jadam.stats``, ...).
This module forwards with a DeprecationWarning until 0.3."""

from jadam import _deprecated

__getattr__ = _deprecated.forward(
    "jadam.health", "jadam", ("HealthStats", "SkipNonfiniteState",
                              "TelemetryState", "skip_nonfinite", "stats",
                              "with_telemetry"))

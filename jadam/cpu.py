"""Settings that exist only for XLA's CPU backend.

:func:`enable_cpu_fusion` turns on XLA:CPU's multi-output fusion for the
process, so that a float32 Adam step is one pass over memory on CPU. It does
nothing for GPUs and TPUs. See ``docs/performance.md``.
"""

from jadam._fusion import enable_cpu_fusion

__all__ = ["enable_cpu_fusion"]

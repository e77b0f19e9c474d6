"""Old home of ``enable_cpu_fusion``, now ``jadam.enable_cpu_fusion``. This
module forwards with a DeprecationWarning until 0.3."""

from jadam import _deprecated

__getattr__ = _deprecated.forward("jadam.cpu", "jadam",
                                  ("enable_cpu_fusion",))

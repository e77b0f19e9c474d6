"""Old spellings that forward to the new ones for one release."""

import importlib
import warnings


def forward(old: str, new: str, names: tuple):
  """A module ``__getattr__`` that serves ``names`` from module ``new``,
  warning that ``old.<name>`` is now ``new.<name>``."""
  def __getattr__(name):  # pylint: disable=invalid-name
    if name not in names:
      raise AttributeError(f"module {old!r} has no attribute {name!r}")
    warnings.warn(f"jadam: {old}.{name} is now {new}.{name}; the old "
                  "spelling goes in 0.3.", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(new), name)
  return __getattr__

"""A pytest plugin that runs optax's own Adam-family tests against jadam.

Loaded with ``-p optax_as_jadam`` (this folder on ``PYTHONPATH``), before
pytest collects anything, it replaces optax's Adam-family functions by
jadam's namesakes in every optax module that the test files read them from.
The test files themselves are the ones shipped inside the installed optax
package; nothing of optax's is copied here. ``tests/test_optax_conformance.py``
runs it and states which tests are expected to differ, and why.
"""

from __future__ import annotations

import functools
import importlib

import jadam

# optax module -> names replaced there by jadam's.
ALIASES = ("adam", "adamw", "nadam", "nadamw", "amsgrad", "adamax", "adamaxw",
           "radam")
TRANSFORMS = ("scale_by_adam", "scale_by_amsgrad", "scale_by_adamax",
              "scale_by_radam")
CONTRIB = ("adopt", "scale_by_adopt", "ademamix", "scale_by_ademamix",
           "schedule_free_adamw")
REPLACED = {
    "optax": ALIASES + TRANSFORMS,
    "optax._src.alias": ALIASES,
    "optax._src.transform": TRANSFORMS,
    "optax.contrib": CONTRIB,
    "optax.contrib._adopt": ("adopt", "scale_by_adopt"),
    "optax.contrib._ademamix": ("ademamix", "scale_by_ademamix"),
    "optax.contrib._schedule_free": ("schedule_free_adamw",),
}


CALLS = {"count": 0}


def _counted(function):
  """``function``, counting its calls (so the run shows jadam was used).

  ``functools.wraps`` keeps the signature visible to ``inspect.signature``,
  which ``optax.inject_hyperparams`` reads.
  """
  @functools.wraps(function)
  def wrapper(*args, **kwargs):
    CALLS["count"] += 1
    return function(*args, **kwargs)
  return wrapper


def replace_optax_with_jadam() -> list[str]:
  """Point optax's Adam-family names at jadam's; returns what was replaced."""
  replaced = []
  wrapped = {}
  for module_name, names in REPLACED.items():
    try:
      module = importlib.import_module(module_name)
    except ImportError:
      continue
    for name in names:
      if hasattr(module, name):
        if name not in wrapped:
          wrapped[name] = _counted(getattr(jadam, name))
        setattr(module, name, wrapped[name])
        replaced.append(f"{module_name}.{name}")
  return replaced


REPLACED_NAMES = replace_optax_with_jadam()


def pytest_report_header(config):  # pylint: disable=unused-argument
  return (f"optax_as_jadam: {len(REPLACED_NAMES)} optax names now jadam's "
          f"(jadam {jadam.__version__})")


# ---------------------------------------------------------------------------
# Which of optax's tests are about the Adam family.

import inspect  # pylint: disable=g-import-not-at-top,wrong-import-position
import re  # pylint: disable=g-import-not-at-top,wrong-import-position

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

FAMILY = re.compile(r"\b(" + "|".join(sorted(
    set(ALIASES + TRANSFORMS + CONTRIB), key=len, reverse=True)) + r")\b")

# Tests (by test method name, and a predicate on the parameters' repr) where
# jadam differs from optax on purpose; docs/migrating.md gives the reasons.
DELIBERATE = {
    # Real parameters with mu_dtype=complex64: jadam keeps a real m (optax a
    # complex one, and complex updates for real parameters). Complex
    # parameters with a real mu_dtype: jadam keeps m complex (optax drops
    # its imaginary part).
    "test_explicit_dtype": lambda params: (
        ("state_dtype='complex64'" in params
         and "params_dtype='complex64'" not in params)
        or ("params_dtype='complex64'" in params
            and re.search(r"state_dtype='(bfloat16|float32)'", params))),
    # Integer "gradients" ({'a': 1, 'b': 2}): jadam raises a TypeError
    # naming the key path.
    "test_extra_args": lambda params: True,
}

# Tests that fail on optax itself on this platform (checked without this
# plugin), so they say nothing about jadam.
OPTAX_OWN_FAILURES = {"test_against_plain_implementation3"}


def _params_repr(item) -> str:
  function = getattr(item, "obj", None)
  return str(getattr(function, "__x_params_repr__", "") or "")


def _about_the_family(item) -> bool:
  params = _params_repr(item)
  if params:
    return bool(FAMILY.search(params))
  try:
    source = inspect.getsource(item.function)
  except (OSError, TypeError):
    return False
  return bool(FAMILY.search(source))


def _base_name(item) -> str:
  # absl names parameterized tests test_name0, test_name1, ...
  return re.sub(r"\d+$", "", item.name.split("[")[0])


def pytest_collection_modifyitems(config, items):
  keep, deliberate, unrelated = [], [], []
  for item in items:
    name = _base_name(item)
    if item.name in OPTAX_OWN_FAILURES or not _about_the_family(item):
      unrelated.append(item)
    elif name in DELIBERATE and DELIBERATE[name](_params_repr(item)):
      deliberate.append(item)
    else:
      keep.append(item)
  config.hook.pytest_deselected(items=unrelated + deliberate)
  items[:] = keep
  config.optax_as_jadam_counts = (len(keep), len(deliberate), len(unrelated))


def pytest_terminal_summary(terminalreporter, config):
  counts = getattr(config, "optax_as_jadam_counts", None)
  if counts:
    terminalreporter.write_line(
        f"optax_as_jadam: {counts[0]} Adam-family tests run against jadam, "
        f"{counts[1]} left out as deliberate differences, {counts[2]} not "
        f"about the Adam family; jadam's functions were called "
        f"{CALLS['count']} times")

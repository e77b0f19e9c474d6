"""jadam: the Adam family as pure Optax GradientTransformations.

Public namespace, one spelling per name:

* ``jadam``: the optimizers (``adam``, ``adamw``, ...), parameter groups
  (``Group``, ``param_paths``, ``set_group_hyperparams``, ...), their
  ``scale_by_*`` transformations and states (optax's classes), ``FlatView``,
  the storage
  formats (``Float``, ``BlockwiseInt8``, ``Int8Moment``) and what reads a
  state (``decode_moments``, ``describe``, ``convert_state``), the health
  wrappers (``skip_nonfinite``, ``skip_spikes``, ``with_telemetry``,
  ``stats``), the numerics doctor (``doctor``, ``diagnose``, ``doctor_log``),
  ``stochastic_rounding`` and ``enable_cpu_fusion``.
* ``jadam.contrib``: ADOPT, AdEMAMix and schedule-free AdamW.
* ``jadam.sharding``: placement on a mesh, ZeRO-1 and host offload.
* ``jadam.rule``: the Adam rule on one array (``adam_step``, ``AdamRule``),
  for reference and for writing one's own transformation around it. The
  engine that turns a per-array step into an optax transformation
  (``jadam._engine.transformation``) is private for now: its per-array step
  type may still change (see ``docs/variants.md``).

Module map (private modules, one concern each):

* ``_rule``: the Adam rule on one array (Kingma & Ba, Algorithm 1) and its
  variant flags: the only place the Adam arithmetic lives.
* ``_engine``: the one engine: ``init``/``update`` of every optimizer from
  its per-array step and a declaration of its moments; the tree walk and the
  per-leaf step (load, rule, store).
* ``_formats/``: how a moment is kept between steps: ``floats`` (float32,
  bfloat16, float16 √v), ``int8`` (block-wise int8 and its step),
  ``_codes`` (the int8 code maps).
* ``_skip``: the skip decision, from ``skip_nonfinite`` and ``skip_spikes``
  into the engine.
* ``_spikes``: dropping loss and gradient-norm spikes (``skip_spikes``).
* ``_transform``: the Adam family's ``scale_by_*`` as flag choices.
* ``_alias``: complete optimizers (``adam``, ``adamw``, ...).
* ``_groups``: parameter groups (``Group``, ``param_paths``, the grouped
  optimizer and its ``GroupHyperparamsState``).
* ``contrib/``: ADOPT, AdEMAMix, schedule-free AdamW (one file each).
* ``_state``: reading states: ``decode_moments``, ``describe``,
  ``convert_state``.
* ``_flat``: the fast path, parameters packed in one buffer per dtype.
* ``_health``: non-finite step skipping and gradient-health telemetry.
* ``_doctor``: the numerics doctor (per-tensor measurements, findings);
  ``_probe``: its request to the transformations inside.
* ``sharding/``: ``_placement`` (state follows its parameter,
  ``abstract_state``), ``_zero1``, ``_offload``.
* ``_rounding``: stochastic rounding and the moments' random streams.
* ``_fusion``: the XLA:CPU policy, in one seam.
* ``_validation``: hyperparameter and gradient checks with clear errors.
* ``_boxes``: Flax's metadata boxes seen through.
* ``_compat``: every JAX API that has moved or may move.
"""

import importlib as _importlib
import warnings as _warnings

from jadam import contrib
from jadam import rule
from jadam import sharding
from jadam._alias import adam
from jadam._alias import adamax
from jadam._alias import adamaxw
from jadam._alias import adamw
from jadam._alias import amsgrad
from jadam._alias import nadam
from jadam._alias import nadamw
from jadam._alias import radam
from jadam._doctor import Diagnosis
from jadam._doctor import DoctorState
from jadam._doctor import Finding
from jadam._doctor import Thresholds
from jadam._doctor import diagnose
from jadam._doctor import doctor
from jadam._doctor import doctor_log
from jadam._flat import FlatView
from jadam._formats import BlockwiseInt8
from jadam._formats import Float
from jadam._formats import Int8Moment
from jadam._fusion import enable_cpu_fusion
from jadam._groups import Group
from jadam._groups import GroupHyperparamsState
from jadam._groups import group_hyperparams
from jadam._groups import param_paths
from jadam._groups import reset_group
from jadam._groups import set_group_hyperparams
from jadam._health import HealthStats
from jadam._health import SkipNonfiniteState
from jadam._health import TelemetryState
from jadam._health import skip_nonfinite
from jadam._health import stats
from jadam._health import with_telemetry
from jadam._spikes import SkipSpikesState
from jadam._spikes import skip_spikes
from jadam._rounding import StochasticRoundingState
from jadam._rounding import stochastic_rounding
from jadam._state import StateSummary
from jadam._state import convert_state
from jadam._state import decode_moments
from jadam._state import describe
from jadam._transform import ScaleByAdamState
from jadam._transform import ScaleByAmsgradState
from jadam._transform import scale_by_adam
from jadam._transform import scale_by_adamax
from jadam._transform import scale_by_amsgrad
from jadam._transform import scale_by_radam

__version__ = "0.2.0"

__all__ = [
    # Optimizers, their scaling transformations and states.
    "adam", "adamax", "adamaxw", "adamw", "amsgrad", "nadam", "nadamw",
    "radam",
    "scale_by_adam", "scale_by_adamax", "scale_by_amsgrad", "scale_by_radam",
    "ScaleByAdamState", "ScaleByAmsgradState",
    # Parameter groups.
    "Group", "GroupHyperparamsState", "group_hyperparams", "param_paths",
    "reset_group", "set_group_hyperparams",
    # The fast path.
    "FlatView",
    # Storage, and reading states.
    "BlockwiseInt8", "Float", "Int8Moment", "StateSummary", "convert_state",
    "decode_moments", "describe", "stochastic_rounding",
    "StochasticRoundingState",
    # Health.
    "HealthStats", "SkipNonfiniteState", "SkipSpikesState", "TelemetryState",
    "skip_nonfinite", "skip_spikes", "stats", "with_telemetry",
    # The numerics doctor.
    "Diagnosis", "DoctorState", "Finding", "Thresholds", "diagnose",
    "doctor", "doctor_log",
    # The CPU backend.
    "enable_cpu_fusion",
    # Grouped namespaces.
    "contrib", "rule", "sharding",
]

# Spellings of earlier releases: they work, with a DeprecationWarning, until
# 0.3.
_MOVED = {
    **{name: "jadam.contrib" for name in contrib.__all__},
    **{name: "jadam.sharding" for name in (
        "abstract_state", "bytes_per_device", "offload", "place_scalars",
        "state_shardings", "zero1", "zero1_shardings")},
    **{name: "jadam.rule" for name in ("AdamRule", "Moments", "adam_step")},
}
_REMOVED = ("QuantizedAdamState", "QuantizedAmsgradState",
            "QuantizedAdemamixState", "QuantizedSecondMomentState")
_OLD_MODULES = ("cpu", "health", "storage")


def __getattr__(name):
  if name in _MOVED:
    _warnings.warn(f"jadam: jadam.{name} is now {_MOVED[name]}.{name}; the "
                   "old spelling goes in 0.3.", DeprecationWarning,
                   stacklevel=2)
    return getattr(_importlib.import_module(_MOVED[name]), name)
  if name in _OLD_MODULES:
    return _importlib.import_module(f"jadam.{name}")
  if name in _REMOVED:
    raise AttributeError(
        f"jadam.{name} was removed in 0.2: an int8 moment is now a "
        "jadam.Int8Moment leaf inside optax's own state classes. Load a "
        "checkpoint written before with jadam.convert_state(restored, "
        "optimizer, params).")
  raise AttributeError(f"module 'jadam' has no attribute {name!r}")

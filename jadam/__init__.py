"""jadam: the Adam family as pure Optax GradientTransformations.

Public namespace: the optimizers, their ``scale_by_*`` transformations and
states, and :class:`FlatView` at the top level; the rest grouped by concern:

* ``jadam.storage``: moment storage formats (``BlockwiseInt8``),
  ``decode_moments``, ``stochastic_rounding``.
* ``jadam.health``: ``skip_nonfinite``, ``with_telemetry``, ``stats``.
* ``jadam.sharding``: ``zero1``, ``offload``, ``abstract_state``,
  ``state_shardings``, ...
* ``jadam.rule``: ``adam_step`` and ``AdamRule``, for writing new variants.
* ``jadam.cpu``: ``enable_cpu_fusion``, a process-wide XLA:CPU setting.

The same names remain importable from the top level (``jadam.zero1`` is
``jadam.sharding.zero1``), as in earlier releases.

Module map (private modules, one concern each). There is one engine: every
optimizer is a per-array step (a ``_rule.LeafRule``) handed to the one tree
walk (``_transform.walk``), which moves each leaf's moments through the one
codec (``_storage.step_leaf``):

* ``_rule``: the Adam rule on one array (Kingma & Ba, Algorithm 1), its
  variant flags, its ``LeafRule`` and the int8 scale bounds its recurrence
  gives. The only place the Adam arithmetic lives.
* ``_variants``: ADOPT, AdEMAMix and schedule-free AdamW, each a ``LeafRule``
  of its own beside the rule (cautious and Keras numerics are flags of the
  rule itself).
* ``_transform``: the one tree walk, the skip decision passed to it as an
  update argument, and ``scale_by_*`` of the Adam family with their states.
* ``_storage``: the one codec: how each moment is kept between steps
  (dtypes, float16 √v, block-wise int8), load and store around the step.
* ``_quant``, ``_rounding``: the int8 code maps; stochastic rounding
  (bfloat16/float16 moments, and ``stochastic_rounding`` for parameters).
* ``_fusion``: the platform policy: when to compute a direction once or once
  per output (the XLA:CPU single-pass form), in one seam.
* ``_validation``: hyperparameter and gradient checks with clear errors.
* ``_alias``: complete optimizers (``adam``, ``adamw``, ...).
* ``_flat``: the fast path, parameters packed in one buffer per dtype.
* ``_health``: non-finite step skipping and gradient-health telemetry.
* ``_sharding``: where state lives on a device mesh (follows parameters, ZeRO-1).
* ``_offload``: state kept in host memory between steps (``offload``).
* ``_boxes``: Flax's metadata boxes (Linen ``AxisMetadata``, NNX
  ``Variable``) seen through, and the boxes int8 block scales get.
* ``_compat``: every JAX API that has moved or may move, newest
  spelling first.
"""

from jadam._alias import adam
from jadam._alias import adamax
from jadam._alias import adamaxw
from jadam._alias import adamw
from jadam._alias import amsgrad
from jadam._alias import nadam
from jadam._alias import nadamw
from jadam._alias import radam
from jadam._flat import FlatView
from jadam._health import HealthStats
from jadam._fusion import enable_cpu_fusion
from jadam._health import SkipNonfiniteState
from jadam._health import TelemetryState
from jadam._health import skip_nonfinite
from jadam._health import stats
from jadam._health import with_telemetry
from jadam._formats import BlockwiseInt8
from jadam._formats import Float
from jadam._formats import Int8Moment
from jadam._rounding import StochasticRoundingState
from jadam._offload import offload
from jadam._rounding import stochastic_rounding
from jadam._rule import AdamRule
from jadam._rule import Moments
from jadam._rule import adam_step
from jadam._sharding import abstract_state
from jadam._sharding import bytes_per_device
from jadam._sharding import place_scalars
from jadam._sharding import state_shardings
from jadam._sharding import zero1
from jadam._sharding import zero1_shardings
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
from jadam._variants import ScaleByAdemamixState
from jadam._variants import ScaleBySecondMomentState
from jadam._variants import ademamix
from jadam._variants import ademamix_b3_schedule
from jadam._variants import adopt
from jadam._variants import scale_by_ademamix
from jadam._variants import scale_by_adopt
from jadam._variants import schedule_free_adamw
from jadam._variants import schedule_free_eval_params

__version__ = "0.1.0"

from jadam import cpu
from jadam import health
from jadam import rule
from jadam import sharding
from jadam import storage

__all__ = [
    # Optimizers.
    "adam",
    "adamax",
    "adamaxw",
    "adamw",
    "ademamix",
    "adopt",
    "amsgrad",
    "nadam",
    "nadamw",
    "radam",
    "schedule_free_adamw",
    "schedule_free_eval_params",
    "ademamix_b3_schedule",
    # Their scaling transformations and states.
    "scale_by_adam",
    "scale_by_adamax",
    "scale_by_ademamix",
    "scale_by_adopt",
    "scale_by_amsgrad",
    "scale_by_radam",
    "ScaleByAdamState",
    "ScaleByAdemamixState",
    "ScaleByAmsgradState",
    "ScaleBySecondMomentState",
    # The fast path.
    "FlatView",
    # Grouped by concern.
    "cpu",
    "health",
    "rule",
    "sharding",
    "storage",
]


_REMOVED = ("QuantizedAdamState", "QuantizedAmsgradState",
            "QuantizedAdemamixState", "QuantizedSecondMomentState")


def __getattr__(name):
  if name in _REMOVED:
    raise AttributeError(
        f"jadam.{name} was removed in 0.4: an int8 moment is now a "
        "jadam.Int8Moment leaf inside optax's own state classes. Load a "
        "checkpoint written before with jadam.convert_state(restored, "
        "optimizer, params).")
  raise AttributeError(f"module 'jadam' has no attribute {name!r}")

"""Adam's younger relatives: ADOPT, AdEMAMix and schedule-free AdamW.

Kept apart as in ``optax.contrib``. Each is a per-array step on the engine
of ``jadam.adam``, so storage dtypes, ``jadam.skip_nonfinite`` and sharding
work alike, with optax's state classes. See ``docs/variants.md``.
"""

from jadam.contrib._ademamix import ScaleByAdemamixState
from jadam.contrib._ademamix import ademamix
from jadam.contrib._ademamix import ademamix_b3_schedule
from jadam.contrib._ademamix import scale_by_ademamix
from jadam.contrib._adopt import adopt
from jadam.contrib._adopt import scale_by_adopt
from jadam.contrib._schedule_free import ScaleBySecondMomentState
from jadam.contrib._schedule_free import schedule_free_adamw
from jadam.contrib._schedule_free import schedule_free_eval_params

__all__ = ["ScaleByAdemamixState", "ScaleBySecondMomentState", "ademamix",
           "ademamix_b3_schedule", "adopt", "scale_by_ademamix",
           "scale_by_adopt", "schedule_free_adamw",
           "schedule_free_eval_params"]

"""Adam's younger relatives: ADOPT, AdEMAMix and schedule-free AdamW.

As ``optax.contrib`` keeps them apart from the established optimizers, so
does jadam. Each is a per-array step handed to the same engine as
``jadam.adam`` (one file each here), so ``mu_dtype`` / ``nu_dtype``, the
in-pass skip of ``jadam.skip_nonfinite`` and sharding mean the same for
them; their states are optax's classes (``optax.ScaleByAdamState``,
``optax.contrib.ScaleByAdemamixState``, and the ``(count, nu)`` state of
``optax.scale_by_rms`` inside ``optax.contrib.ScheduleFreeState``). See
``docs/variants.md``.
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

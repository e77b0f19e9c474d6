"""Where optimizer state lives on a device mesh.

State follows parameter sharding under ``jax.jit`` with no call needed.
``abstract_state``, ``state_shardings`` and ``state_specs`` give its
placement without allocating it; ``scales_follow_rows`` is the rule for int8
block scales; ``zero1`` splits the state over the data axis (ZeRO-1);
``offload`` keeps it in host memory between steps; ``place_scalars`` makes
an eager init compile once. See ``docs/distributed.md``, ``docs/memory.md``.
"""

from jadam.sharding._offload import offload
from jadam.sharding._placement import abstract_state
from jadam.sharding._placement import bytes_per_device
from jadam.sharding._placement import place_scalars
from jadam.sharding._placement import scales_follow_rows
from jadam.sharding._placement import state_shardings
from jadam.sharding._placement import state_specs
from jadam.sharding._zero1 import zero1
from jadam.sharding._zero1 import zero1_shardings

__all__ = ["abstract_state", "bytes_per_device", "offload", "place_scalars",
           "scales_follow_rows", "state_shardings", "state_specs", "zero1",
           "zero1_shardings"]

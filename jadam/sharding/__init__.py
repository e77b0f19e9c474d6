"""Where optimizer state lives on a device mesh.

State follows parameter sharding under ``jax.jit`` with no call needed;
:func:`abstract_state` and :func:`state_shardings` give the state's
placement without allocating it, :func:`state_specs` its partition specs
from the parameters' (mesh axis or Flax logical names) without compiling;
:func:`scales_follow_rows` is the placement rule of int8 block scales;
:func:`zero1` splits the state over the data-parallel axis (ZeRO stage 1); :func:`offload` keeps it in host memory
between steps; :func:`place_scalars` places the loose scalars of an optax
wrapper's eager init so that the step compiles once. See
``docs/distributed.md`` and ``docs/memory.md``.
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

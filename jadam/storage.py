"""How moments (and parameters) are stored between steps.

``mu_dtype=``/``nu_dtype=`` of every optimizer take float32, bfloat16,
float16, ``"int8"`` or a :class:`BlockwiseInt8`; :func:`decode_moments`
reads any state's moments back as float arrays; :func:`stochastic_rounding`
keeps low-precision parameters training. See ``docs/memory.md``.
"""

from jadam._formats import BlockwiseInt8
from jadam._formats import Float
from jadam._formats import Int8Moment
from jadam._rounding import StochasticRoundingState
from jadam._rounding import stochastic_rounding
from jadam._state import convert_state
from jadam._state import decode_moments
from jadam._state import describe

__all__ = ["BlockwiseInt8", "Float", "Int8Moment", "StochasticRoundingState",
           "convert_state", "decode_moments", "describe",
           "stochastic_rounding"]

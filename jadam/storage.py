"""Old home of the storage names; they are at the top level now
(``jadam.BlockwiseInt8``, ``jadam.decode_moments``, ...). This module
forwards with a DeprecationWarning until 0.3."""

from jadam import _deprecated

__getattr__ = _deprecated.forward(
    "jadam.storage", "jadam", ("BlockwiseInt8", "Float", "Int8Moment",
                               "StochasticRoundingState", "convert_state",
                               "decode_moments", "describe",
                               "stochastic_rounding"))

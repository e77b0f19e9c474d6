"""The Adam rule on one array, for building new variants.

``jadam.rule.adam_step(g, moments, t, rule)`` is the single implementation
of Kingma & Ba's Algorithm 1 and its family flags (``AdamRule``) that
every optimizer in jadam runs; see ``jadam._rule`` for the notation.
"""

from jadam._rule import AdamRule
from jadam._rule import Moments
from jadam._rule import adam_step

__all__ = ["AdamRule", "Moments", "adam_step"]

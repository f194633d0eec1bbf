"""Speculative decoding on the driver: proposers (`ngram`, `suffix`) and their counters.

The proposers guess each decoding sequence's next tokens from tokens alone; the scheduler
sends the guesses as a short extend and the worker verifies them in the same step
(sample/speculative). See `proposer.py` for which sequences get proposals.
"""

from ernie_cluster.engine.speculative.proposer import SpeculativeProposer
from ernie_cluster.engine.speculative.stats import SpecDecodeStats

__all__ = ["SpecDecodeStats", "SpeculativeProposer"]

"""Speculative decoding on the driver: proposers (`ngram`, `suffix`, `draft_model`), where
their work fits in a step (`step_slots.py`) and their counters.

ngram and suffix guess each decoding sequence's next tokens from tokens alone; draft_model
hands out the tokens a draft model proposed in the worker (worker/draft_runner). The scheduler
sends the guesses as a short extend and the worker verifies them in the same step
(sample/speculative). See `proposer.py` for which sequences get proposals.
"""

from ernie_cluster.engine.speculative.proposer import SpeculativeProposer
from ernie_cluster.engine.speculative.stats import SpecDecodeStats

__all__ = ["SpecDecodeStats", "SpeculativeProposer"]

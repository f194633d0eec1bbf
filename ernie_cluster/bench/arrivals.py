"""When sessions arrive: Poisson or gamma processes at a mean rate, or all at once.

Gaps are gamma-distributed with shape `burstiness` and mean 1/rate: burstiness 1 is a
Poisson process, below 1 burstier (a coefficient of variation of 1/sqrt(burstiness)),
above 1 more regular.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator


def arrival_gaps(rate: float, burstiness: float = 1.0, seed: int | None = None) -> Iterator[float]:
    """Endless seconds between consecutive arrivals; all zero when `rate` is infinite."""
    if not rate > 0:
        raise ValueError(f"request rate must be > 0 (inf for all at once), got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    rng = random.Random(seed)
    while True:
        yield 0.0 if math.isinf(rate) else rng.gammavariate(burstiness, 1.0 / (rate * burstiness))

"""When and how long a stream tries to get its connection back."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class ReconnectPolicy:
    """Exponential backoff with jitter, bounded in total time.

    The first attempt after a drop is immediate (a blip usually heals at once); each further one
    waits `initial_delay_s * multiplier**n`, at most `max_delay_s`, randomised by ±`jitter` so
    that many clients of a restarted daemon do not return in lockstep. After `give_up_after_s`
    without a connection the stream fails with ConnectionLostError.
    """

    initial_delay_s: float = 0.25
    max_delay_s: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2  # fraction of each delay
    give_up_after_s: float = 60.0

    def __post_init__(self) -> None:
        if self.initial_delay_s <= 0 or self.max_delay_s < self.initial_delay_s:
            raise ValueError("need 0 < initial_delay_s <= max_delay_s")
        if self.multiplier < 1 or not 0 <= self.jitter < 1 or self.give_up_after_s < 0:
            raise ValueError("need multiplier >= 1, 0 <= jitter < 1, give_up_after_s >= 0")

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """Seconds to wait before each attempt: 0, then growing delays, forever."""
        rng = rng or random.Random()
        yield 0.0
        delay = self.initial_delay_s
        while True:
            yield delay * (1 + rng.uniform(-self.jitter, self.jitter))
            delay = min(delay * self.multiplier, self.max_delay_s)

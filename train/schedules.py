"""Learning-rate and sparsity-coefficient schedules as pure functions of the step (so resuming is exact).

The learning rate follows SAELens 5.x `get_lr_scheduler("cosineannealing", ...)`: a linear warm-up from
`lr / warmup_steps` to `lr`, a cosine decay from `lr` to the floor `lr_end`, then a linear decay from
`lr_end` to 0 over the last `decay_steps`. The sparsity coefficient warms up linearly (SAELens
`L1Scheduler`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from steer.errors import ConfigError


@dataclass(frozen=True)
class LRSchedule:
    lr: float
    lr_end: float
    total_steps: int
    warmup_steps: int
    decay_steps: int

    def __post_init__(self) -> None:
        if self.warmup_steps + self.decay_steps > self.total_steps:
            raise ConfigError(
                f"warm-up ({self.warmup_steps}) + decay ({self.decay_steps}) steps exceed "
                f"the {self.total_steps} training steps"
            )

    def __call__(self, step: int) -> float:
        """Learning rate used by optimiser step `step` (0-indexed)."""
        w, d = self.warmup_steps, self.decay_steps
        if step < w:
            if w == 1:
                return self.lr
            start = 1.0 / w
            return self.lr * (start + (1.0 - start) * step / (w - 1))
        main_steps = self.total_steps - w - d
        t = step - w
        if t < main_steps:
            return self.lr_end + (self.lr - self.lr_end) * (1 + math.cos(math.pi * t / main_steps)) / 2
        t -= main_steps
        return self.lr_end * max(0.0, 1.0 - t / d) if d else self.lr_end


@dataclass(frozen=True)
class SparsityWarmup:
    coefficient: float
    warmup_steps: int

    def __call__(self, step: int) -> float:
        """Sparsity coefficient used by optimiser step `step` (0-indexed)."""
        if self.warmup_steps <= 0:
            return self.coefficient
        return self.coefficient * min(1.0, (step + 1) / self.warmup_steps)

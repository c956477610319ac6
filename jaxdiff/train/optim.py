"""Optimiser recipe: AdamW with linear warm-up, cosine or constant decay, and global-norm clipping."""
from __future__ import annotations

from dataclasses import dataclass

import optax

SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW (Loshchilov & Hutter 2019) with gradient clipping; ``total_steps`` sets the cosine horizon."""

    learning_rate: float = 1e-3
    warmup_steps: int = 0
    schedule: str = "cosine"
    total_steps: int = 10_000
    final_lr_fraction: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = 1.0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown learning-rate schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if self.warmup_steps < 0 or self.total_steps <= 0:
            raise ValueError(f"need warmup_steps >= 0 and total_steps > 0, got {self.warmup_steps}, {self.total_steps}")
        if self.schedule == "cosine" and self.warmup_steps >= self.total_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below total_steps ({self.total_steps})")


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Linear warm-up from 0 to the peak over ``warmup_steps``, then constant or cosine decay."""
    peak = cfg.learning_rate
    if cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    else:
        after = optax.cosine_decay_schedule(peak, cfg.total_steps - cfg.warmup_steps, alpha=cfg.final_lr_fraction)
    if cfg.warmup_steps == 0:
        return after
    warm = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
    return optax.join_schedules([warm, after], [cfg.warmup_steps])


def make_optimizer(cfg: OptimizerConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``optax.chain(clip_by_global_norm, adamw(schedule))`` and the schedule (for logging)."""
    schedule = learning_rate_schedule(cfg)
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.clip_norm is None:
        return adamw, schedule
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw), schedule

"""The typed hyperparameters of one training, and their range checks.

The config schema (pipeline.config) uses this dataclass as the `train` group,
so Hydra checks types and names, and `fit` receives an instance of it, not a
config node.
"""

import math
from dataclasses import dataclass

SCHEDULES = ("constant", "step", "cosine")


@dataclass
class Hyperparams:
    lr: float = 0.2
    epochs: int = 20
    batch_size: int = 128  # 1 is the lecture's per-sample SGD
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | step | cosine
    step_epochs: int = 10  # schedule=step: multiply lr by gamma every step_epochs epochs
    gamma: float = 0.1

    def problems(self):
        """(key, value, expected) for each value out of range; empty when all are fine."""
        finite = {key: math.isfinite(getattr(self, key)) for key in ("lr", "momentum", "weight_decay", "gamma")}
        checks = [
            ("lr", finite["lr"] and self.lr > 0, "a finite learning rate > 0"),
            ("epochs", self.epochs >= 1, "an integer >= 1"),
            ("batch_size", self.batch_size >= 1, "an integer >= 1 (1 is per-sample SGD)"),
            ("momentum", 0 <= self.momentum < 1, "0 <= momentum < 1"),
            ("nesterov", self.momentum > 0 or not self.nesterov, "false unless train.momentum > 0"),
            ("weight_decay", finite["weight_decay"] and self.weight_decay >= 0, "a finite value >= 0"),
            ("schedule", self.schedule in SCHEDULES, f"one of {SCHEDULES}"),
            ("step_epochs", self.step_epochs >= 1, "an integer >= 1"),
            ("gamma", 0 < self.gamma <= 1, "0 < gamma <= 1"),
        ]
        return [(key, getattr(self, key), expected) for key, ok, expected in checks if not ok]

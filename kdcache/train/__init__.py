"""Stage two: train students against stored teacher targets (the teacher is never loaded).

``Trainer``/``train`` run a configured job; ``TrainConfig`` is its configuration; the strategies
(n2n, e2n, v2v, vanilla1, vanilla2 and weighted mixes) live in :mod:`kdcache.train.strategies`.
"""

from kdcache.train.config import TrainConfig
from kdcache.train.strategies import STRATEGIES, STRATEGY_NAMES, parse_strategy
from kdcache.train.trainer import Trainer, train

__all__ = ["STRATEGIES", "STRATEGY_NAMES", "TrainConfig", "Trainer", "parse_strategy", "train"]

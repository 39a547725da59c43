"""Stage two: train students against stored teacher targets (the teacher is never loaded).

``Trainer``/``train`` run a configured job; ``TrainConfig`` is its configuration; the strategies
(n2n, e2n, v2v, vanilla1, vanilla2 and weighted mixes) live in :mod:`kdcache.train.strategies`.
"""

from kdcache.train.config import TrainConfig
from kdcache.train.strategies import STRATEGIES, STRATEGY_NAMES, parse_strategy

__all__ = ["STRATEGIES", "STRATEGY_NAMES", "TrainConfig", "Trainer", "parse_strategy", "train"]


def __getattr__(name: str):
    # the trainer pulls in the data stack (torch_geometric, seconds to import): only when used, so
    # that reading the settings schema (`kdcache --help`, recipe checks) stays fast
    if name in ("Trainer", "train"):
        from kdcache.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

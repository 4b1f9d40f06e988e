"""Models: importing this package registers every model by name (see base.py for the contract)."""

from .base import REGISTRY, Recommender, model_class, register
from . import bm3, bpr, fitmm, freedom, lgmrec, lightgcn, pop, smore, vbpr  # noqa: F401  (registration side effects)

__all__ = ["REGISTRY", "Recommender", "model_class", "register"]

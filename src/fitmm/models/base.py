"""The contract every model follows, and the name -> class registry.

A model is one file: a `Recommender` subclass with a `name`, its `defaults` (config keys it adds
or overrides, e.g. `lr`), and three methods:

    loss(batch)   -> (scalar tensor, {part name: float}) for one training batch
    embed()       -> (user vectors, item vectors) for scoring; the evaluator calls it ONCE per
                     evaluation, so any graph propagation happens once, not per user chunk
    score(u, i)   -> scores of user vectors u against item vectors i (default: dot product)

The trainer and evaluator know nothing else about models: adding one never touches them.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..config import Bound, suggest
from ..data.dataset import Dataset
from ..data.sampling import Batch
from ..errors import InputError
from ..knn import validate_modality_weights

REGISTRY: dict[str, type["Recommender"]] = {}


def register(cls: type["Recommender"]) -> type["Recommender"]:
    REGISTRY[cls.name] = cls
    return cls


def model_class(name: str) -> type["Recommender"]:
    if name not in REGISTRY:
        raise InputError(
            f"unknown model '{name}'{suggest(name, REGISTRY)}; available: {', '.join(sorted(REGISTRY))}"
        )
    return REGISTRY[name]


class Recommender(nn.Module):
    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    # Next to `defaults`: the range of each numeric key (config.Bound, checked before anything is
    # written; every numeric key has one) and a one-line meaning of each key (`fitmm config`).
    bounds: ClassVar[dict[str, Bound]] = {}
    key_help: ClassVar[dict[str, str]] = {}
    # Allowed values of string keys in `defaults` (checked before anything is written).
    choices: ClassVar[dict[str, tuple]] = {}
    # Hyper-parameters to tune: {config key: [values]} (a finite set: the field's usual grid, which
    # `fitmm bench --grid` trains in full) or {config key: {type: float|int, low, high, log}} (a
    # range, which only `fitmm search` / `bench --search` can explore); format in search.py.
    search_space: ClassVar[dict[str, Any]] = {}
    # Models without negatives (e.g. BM3) set this False and the sampler skips drawing them.
    uses_negatives: ClassVar[bool] = True
    # Models with nothing to learn (most-popular) set this False and are only evaluated.
    trainable: ClassVar[bool] = True
    # Models that use item content set this True; check() then refuses ID-only datasets.
    needs_features: ClassVar[bool] = False
    # Attributes holding fixed sparse graphs (torch sparse tensors or None): moved along with
    # the model by .to(device) and never saved in checkpoints (they are rebuilt from the data).
    graph_attributes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, dataset: Dataset, config: dict[str, Any]):
        super().__init__()
        self.n_users = dataset.n_users
        self.n_items = dataset.n_items
        self.config = config

    @classmethod
    def check(cls, dataset: Dataset, config: dict[str, Any]) -> None:
        """Raise InputError when this model cannot run on `dataset` with `config` (before any write).

        Subclasses extend it (call super().check first); the default checks `choices`.
        """
        for key, options in cls.choices.items():
            if config[key] not in options:
                raise InputError(f"config key '{key}': {config[key]!r} is not one of {', '.join(options)}")
        if cls.needs_features and not dataset.features:
            raise InputError(
                f"{dataset.source or dataset.name}: model '{cls.name}' needs item content features and this "
                f"dataset has none (ID-only); add <modality>_feat.npy files, or use an ID-only model (bpr, lightgcn, pop)"
            )

    def add_modality_projections(self, dataset: Dataset, dim: int, trainable_features: bool = False) -> None:
        """Item features per modality and, as `self.projections`, a trainable linear map of each to
        `dim`; `item_features()` lists them. Frozen features are buffers (not saved: they are data);
        `trainable_features` makes them parameters, fine-tuned and saved, as models do whose
        reference implementation trains its raw feature tables."""
        self.projections = nn.ModuleList()
        for m, name in enumerate(dataset.modalities):
            feat = torch.from_numpy(dataset.features_for_model(name, trained=trainable_features))
            if trainable_features:
                self.register_parameter(f"item_features_{m}", nn.Parameter(feat))
            else:
                self.register_buffer(f"item_features_{m}", feat, persistent=False)
            self.projections.append(nn.Linear(feat.shape[1], dim))

    def item_features(self) -> list[torch.Tensor]:
        return [getattr(self, f"item_features_{m}") for m in range(len(self.projections))]

    @staticmethod
    def check_modality_weights(dataset: Dataset, config: dict[str, Any], key: str = "modality_weights") -> None:
        """A non-empty {modality: weight} mapping must name the dataset's modalities and sum to 1."""
        if config[key]:
            try:
                validate_modality_weights(config[key], dataset.modalities)
            except ValueError as exc:
                raise InputError(f"config key '{key}': {exc}") from None

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        for name in self.graph_attributes:
            graph = getattr(self, name, None)
            if graph is not None:
                setattr(self, name, fn(graph))
        return out

    def start_epoch(self, epoch: int, rng: np.random.Generator) -> None:
        """Hook for per-epoch work (e.g. re-sampling a pruned graph)."""

    def lr_factor(self, epoch: int) -> float:
        """The learning-rate multiplier for (1-based) `epoch`; the trainer sets lr = config lr * this
        before each epoch. Default: 1 (constant), as in the reference trainer's default schedule."""
        return 1.0

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def embed(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def score(self, user_vectors: torch.Tensor, item_vectors: torch.Tensor) -> torch.Tensor:
        return user_vectors @ item_vectors.T

    # -- optional: explanations and cold-start items (used by fitmm.api, never by training) -------

    def explain_parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(user parts, item parts), one row per user / item: what `explain` needs about each.

        Computed once for all nodes by the API and cached. Default: the embeddings themselves."""
        return self.embed()

    def explain(self, user_part: torch.Tensor, item_part: torch.Tensor) -> dict[str, Any]:
        """Why this user gets this item: {"score": s, ...}. Default: the score alone; models with
        per-band or per-modality parts add them, each group summing to the score."""
        return {"score": float(self.score(user_part[None].double(), item_part[None].double())[0, 0])}

    def cold_items(self, dataset: Dataset, features: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """(item vectors, item parts) for new items known only by their content (rows of
        `features[modality]`, validated by the caller). Models that can score such items override it."""
        raise NotImplementedError(f"model '{self.name}' cannot score new items from their content")


def bpr_loss(pos_scores: torch.Tensor, neg_scores: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(pos - neg), averaged over the batch."""
    return nn.functional.softplus(neg_scores - pos_scores).mean()


def l2_penalty(*tensors: torch.Tensor) -> torch.Tensor:
    """Half the summed squared norms of the batch's rows, per batch row (the usual BPR-MF penalty)."""
    batch = tensors[0].shape[0]
    return sum(t.pow(2).sum() for t in tensors) / (2 * batch)


def embedding_norm_penalty(*tensors: torch.Tensor) -> torch.Tensor:
    """The field's "EmbLoss" (MMRec `common/loss.py`): the sum of each tensor's Frobenius norm,
    NOT squared, divided by the number of rows of the last tensor (the batch, or all items when
    whole tables are passed). Its gradient has a fixed size whatever the embeddings' scale, so
    reg_weight values are not comparable with those of `l2_penalty`."""
    return sum(torch.linalg.vector_norm(t) for t in tensors) / tensors[-1].shape[0]

"""FREEDOM (Zhou & Shen, ACM MM'23): FREEzes the item-item graph and DenOises the user-item graph.

What the paper does, step by step (and how this file does it):

1. Frozen item-item graph. Per content modality m: cosine similarities of the raw item features,
   each item keeps its top-k neighbours as unweighted edges (S^m_ij = 1), the adjacency is
   normalised D^-1/2 S^m D^-1/2, and the modalities are mixed S = sum_m alpha_m S^m. It is built
   ONCE before training and never updated (no gradient, no re-learning as in LATTICE).
   Interpretation: every row of the kNN adjacency has exactly k entries, so its degree matrix
   (row sums) is k*I and D^-1/2 S^m D^-1/2 = S^m / k, which is exactly the row-normalised graph
   `knn.knn_graph` builds. So `knn.cached_mixed_knn_graph` (k = knn_k, weights = modality_weights)
   is used as is, and cached on disk. Default weights: the reference's mm_image_weight, 0.1 for
   a modality named 'image' and 0.9 for the other when there are exactly two (so TikTok's image
   and audio get 0.1 / 0.9, as in the reference run that gave MMRec audio as its "text"); equal
   weights otherwise.
2. Denoised user-item graph. Every epoch, degree-sensitive edge pruning samples the training
   edges to KEEP with probability proportional to 1 / sqrt(deg_u * deg_i) (edges between two
   popular nodes are the likeliest to be dropped), keeping floor((1 - dropout) * |E|) of them, and
   the pruned symmetric adjacency is re-normalised D^-1/2 A D^-1/2 with its own degrees.
   Interpretation: the draws are without replacement, each successive draw proportional to the
   weights of the edges not drawn yet (the reference's torch.multinomial), keeping
   floor((1 - dropout) * |E|) edges as it does; this is done with the exponential-race method
   (Efraimidis & Spirakis: keep the n smallest Exp(1)/w keys), using the epoch rng the trainer
   passes to `start_epoch`, so a run is reproducible and resumable. Degrees are those of the full
   training graph. Training uses the pruned graph; `embed()` (evaluation) uses the full graph.
3. Representations. ID embeddings for users and items; LightGCN over the (pruned) user-item graph
   with the mean of layers 0..n_ui_layers as readout; the item ID embeddings are also propagated
   n_mm_layers times over the frozen item graph (the last layer's output is kept), and that is
   ADDED to the item side: h_u = LightGCN_u, h_i = LightGCN_i + S^L e_i.
4. Loss. BPR on (h_u, h_i, h_j), plus lambda times one BPR term per modality in which the item is
   represented by its projected raw features h_i^m = W_m x_i^m + b_m (a linear layer per modality)
   against the same h_u. The raw features x^m are trainable here (the reference fine-tunes its
   feature tables; the kNN graph is built once from the features as loaded). The projections are
   only used in this loss (not at inference): they act as a regulariser that pulls user
   embeddings towards the content.
   Interpretation of the config keys: the paper's lambda (the weight of the modality BPR terms) is
   the key `reg_weight`, the hyper-parameter the field searches over {0, 1e-5, 1e-4, 1e-3}; the
   default is the reference yaml's first configuration: reg_weight 0 (those terms off), dropout
   0.8. The paper (as we read it) has no separate L2 term; `l2_weight` adds the usual batch L2 on
   the ego embeddings for those who want one (default 0 = off).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from ..config import AT_LEAST_0, AT_LEAST_1, FRACTION, cache_dir
from ..errors import InputError
from ..graphs import normalized_adjacency, sparse_matmul, to_torch
from ..knn import cached_mixed_knn_graph, default_modality_weights
from .base import Recommender, bpr_loss, l2_penalty, register
from .lightgcn import propagate


def degree_sensitive_sample(weights: np.ndarray, n_keep: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of `n_keep` edges drawn without replacement, each draw proportional to `weights`.

    Exponential race: key_e = Exp(1) / w_e; the n_keep smallest keys are distributed exactly as
    n_keep successive weighted draws without replacement.
    """
    if n_keep >= len(weights):
        return np.arange(len(weights))
    keys = rng.exponential(size=len(weights)) / weights
    return np.sort(np.argpartition(keys, n_keep)[:n_keep])


def freedom_modality_weights(names: list[str]) -> dict[str, float]:
    """The reference's mm_image_weight: 'image' 0.1 and the other 0.9 when there are exactly two
    modalities and one is 'image'; otherwise the library's default (equal weights)."""
    if len(names) == 2 and "image" in names:
        return {name: 0.1 if name == "image" else 0.9 for name in names}
    return default_modality_weights(names)


@register
class FREEDOM(Recommender):
    name = "freedom"
    needs_features = True
    graph_attributes = ("adjacency", "train_adjacency", "item_graph", "item_graph_t")
    defaults = {
        "embedding_size": 64,
        "lr": 1e-3,
        "epochs": 1000,
        "dropout": 0.8,
        "reg_weight": 0.0,
        "l2_weight": 0.0,
        "knn_k": 10,
        "n_ui_layers": 2,
        "n_mm_layers": 1,
        "modality_weights": {},
    }
    bounds = {
        "embedding_size": AT_LEAST_1, "dropout": FRACTION, "reg_weight": AT_LEAST_0, "l2_weight": AT_LEAST_0,
        "knn_k": AT_LEAST_1, "n_ui_layers": AT_LEAST_0, "n_mm_layers": AT_LEAST_0,
    }
    key_help = {
        "embedding_size": "embedding width",
        "dropout": "fraction of user-item edges pruned each epoch",
        "reg_weight": "the paper's lambda: weight of the per-modality BPR terms",
        "l2_weight": "optional batch L2 on the ego embeddings (not in the paper)",
        "knn_k": "neighbours per item in the item-item kNN graph (at most the number of items)",
        "n_ui_layers": "layers over the user-item graph",
        "n_mm_layers": "layers over the item-item graph",
        "modality_weights": "modality -> alpha_m in the item graph; {} = 0.1 image / 0.9 the other of two, else equal",
    }
    search_space = {"dropout": [0.8, 0.9], "reg_weight": [0.0, 1e-5, 1e-4, 1e-3]}

    @classmethod
    def check(cls, dataset, config):
        super().check(dataset, config)
        if config["knn_k"] > dataset.n_items:
            raise InputError(f"config key 'knn_k': must be at most the number of items ({dataset.n_items}), got {config['knn_k']}")
        cls.check_modality_weights(dataset, config)

    def __init__(self, dataset, config):
        super().__init__(dataset, config)
        d = config["embedding_size"]
        self.user_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_users, d)))
        self.item_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_items, d)))

        # Modality projections h_i^m = W_m x_i^m + b_m (features are data: not saved in checkpoints).
        self.modalities = dataset.modalities
        self.add_modality_projections(dataset, d, trainable_features=True)

        # 1. The frozen item-item graph (not symmetric: its transpose is kept for the backward pass).
        weights = config["modality_weights"] or freedom_modality_weights(self.modalities)
        s = cached_mixed_knn_graph(dataset.features, config["knn_k"], weights, dataset.fingerprint, cache_dir(config))
        self.item_graph, self.item_graph_t = to_torch(s), to_torch(s.T.tocsr())

        # 2. The training edges and their pruning weights 1/sqrt(deg_u deg_i) on the full graph.
        coo = dataset.train.tocoo()
        self.edge_users = coo.row.astype(np.int64)
        self.edge_items = coo.col.astype(np.int64)
        deg_u = np.bincount(self.edge_users, minlength=self.n_users).astype(np.float64)
        deg_i = np.bincount(self.edge_items, minlength=self.n_items).astype(np.float64)
        self.edge_weights = 1.0 / np.sqrt(deg_u[self.edge_users] * deg_i[self.edge_items])
        self.adjacency = to_torch(normalized_adjacency(dataset.train))  # full graph: evaluation
        self.train_adjacency = self.adjacency  # pruned graph: replaced by start_epoch

    # -- 2: degree-sensitive edge pruning -----------------------------------------------------

    def pruned_edges(self, rng: np.random.Generator) -> np.ndarray:
        """Indices (into the training edges) of the edges kept this epoch."""
        n_keep = int((1.0 - self.config["dropout"]) * len(self.edge_weights))
        return degree_sensitive_sample(self.edge_weights, n_keep, rng)

    def pruned_adjacency(self, rng: np.random.Generator) -> sp.csr_matrix:
        """The re-normalised symmetric adjacency D^-1/2 A D^-1/2 of this epoch's kept edges (scipy)."""
        keep = self.pruned_edges(rng)
        kept = sp.csr_matrix(
            (np.ones(len(keep), dtype=np.float32), (self.edge_users[keep], self.edge_items[keep])),
            shape=(self.n_users, self.n_items),
        )
        return normalized_adjacency(kept)

    def start_epoch(self, epoch, rng):
        if self.config["dropout"] > 0:
            self.train_adjacency = to_torch(self.pruned_adjacency(rng), device=self.user_emb.device)

    # -- 3: representations -------------------------------------------------------------------

    def _forward(self, adjacency):
        ego = torch.cat([self.user_emb, self.item_emb])
        out = torch.stack(propagate(adjacency, ego, self.config["n_ui_layers"])).mean(0)
        items_mm = self.item_emb
        for _ in range(self.config["n_mm_layers"]):
            items_mm = sparse_matmul(self.item_graph, items_mm, self.item_graph_t)
        return out[: self.n_users], out[self.n_users:] + items_mm

    def embed(self):
        return self._forward(self.adjacency)

    # -- 4: loss ------------------------------------------------------------------------------

    def loss(self, batch):
        cfg = self.config
        users, items = self._forward(self.train_adjacency)
        u = users[batch.users]
        rec = bpr_loss((u * items[batch.pos_items]).sum(1), (u * items[batch.neg_items]).sum(1))
        total = rec
        parts = {"bpr": rec.item()}
        if cfg["reg_weight"]:
            modal = sum(
                bpr_loss((u * proj(feat[batch.pos_items])).sum(1), (u * proj(feat[batch.neg_items])).sum(1))
                for proj, feat in zip(self.projections, self.item_features())
            )
            total = total + cfg["reg_weight"] * modal
            parts["modal_bpr"] = modal.item()
        if cfg["l2_weight"]:
            l2 = cfg["l2_weight"] * l2_penalty(
                self.user_emb[batch.users], self.item_emb[batch.pos_items], self.item_emb[batch.neg_items]
            )
            total = total + l2
            parts["l2"] = l2.item()
        return total, parts

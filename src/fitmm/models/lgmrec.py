"""LGMRec (Guo et al., AAAI'24): local and global graph learning for multimodal recommendation.

Written from the paper's description ("LGMRec: Local and Global Graph Learning for Multimodal
Recommendation"); no code was taken from the authors' or MMRec's implementation.

1. Local graph embeddings (decoupled):
   - collaborative: LightGCN over the normalised user-item graph on ID embeddings
     (n_ui_layers; mean of the layer outputs, layer 0 included);
   - per modality: item rows are a linear projection of the (frozen) item features, user rows
     start as the mean of their training items' projections; the pair propagates over the same
     user-item graph (n_mm_layers; the last layer is kept).
   Local embedding = collaborative + sum_m L2-normalise(modality embedding).
2. Global hypergraph embeddings: per modality, hyper_num learnable hyperedges V^m living in the
   feature space. Item-hyperedge dependencies H_i^m = softmax over hyperedges of X^m V^m^T
   (Gumbel-softmax with temperature 1 in training, as the paper; plain softmax in evaluation so
   that evaluation is deterministic); user-hyperedge dependencies H_u^m = R H_i^m (R: binary
   training interactions). During training both are dropped out with keep probability
   keep_rate (kept entries are scaled by 1/keep_rate). n_hyper_layers hypergraph layers start
   from the collaborative item embeddings:
       E_i <- H_i (H_i^T E_i),   E_u <- H_u (H_i^T E_i)
   (each factor with its own dropout mask). Global embedding = sum over modalities.
3. Final embedding = local + alpha * L2-normalise(global).
4. Loss: BPR + cl_weight * hypergraph contrastive loss + reg_weight * L2 of the batch's ego ID
   embeddings. The contrastive loss is InfoNCE (temperature tau) between the global embeddings
   of two modalities for the batch's distinct users and distinct positive items, summed over
   users and items and averaged over modality pairs; with a single modality it is 0.

Interpretations: any number of modalities >= 1 (the paper has image and text); user modal
embeddings are initialised from interacted items rather than learnt freely; the
Gumbel noise is drawn only in training (config `gumbel`: false turns it off altogether).
"""

from __future__ import annotations

import itertools

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from ..graphs import normalized_adjacency, sparse_matmul, to_torch
from ..config import AT_LEAST_0, AT_LEAST_1, Bound, POSITIVE
from .base import Recommender, bpr_loss, l2_penalty, register
from .lightgcn import propagate
from .smore import info_nce


@register
class LGMRec(Recommender):
    name = "lgmrec"
    needs_features = True
    graph_attributes = ("adjacency", "interactions", "interactions_t", "user_mean", "user_mean_t")
    defaults = {
        "embedding_size": 64,
        "lr": 1e-3,
        "n_ui_layers": 2,
        "n_mm_layers": 2,
        "hyper_num": 4,
        "n_hyper_layers": 1,
        "keep_rate": 0.5,
        "gumbel": True,
        "alpha": 0.3,
        "cl_weight": 1e-4,
        "reg_weight": 1e-6,
        "tau": 0.2,
    }
    bounds = {
        "embedding_size": AT_LEAST_1, "n_ui_layers": AT_LEAST_0, "n_mm_layers": AT_LEAST_0,
        "hyper_num": AT_LEAST_1, "n_hyper_layers": AT_LEAST_0, "keep_rate": Bound(0, 1, low_open=True),
        "alpha": AT_LEAST_0, "cl_weight": AT_LEAST_0, "reg_weight": AT_LEAST_0, "tau": POSITIVE,
    }
    key_help = {
        "embedding_size": "embedding width",
        "n_ui_layers": "collaborative local graph layers",
        "n_mm_layers": "modality local graph layers",
        "hyper_num": "hyperedges per modality",
        "n_hyper_layers": "hypergraph layers",
        "keep_rate": "keep probability of the hyperedge-dependency dropout (training only)",
        "gumbel": "Gumbel-softmax over hyperedges in training (plain softmax when false)",
        "alpha": "weight of the global (hypergraph) embeddings",
        "cl_weight": "weight of the contrastive term",
        "reg_weight": "weight of the L2 penalty",
        "tau": "temperature of the contrastive term",
    }
    search_space = {
        "hyper_num": [4, 8, 16],
        "alpha": [0.2, 0.3, 0.6],
    }

    def __init__(self, dataset, config):
        super().__init__(dataset, config)
        d = config["embedding_size"]
        self.modalities = dataset.modalities
        self.user_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_users, d)))
        self.item_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_items, d)))
        self.add_modality_projections(dataset, d)
        self.hyperedges = nn.ParameterList(
            nn.Parameter(nn.init.xavier_uniform_(torch.empty(config["hyper_num"], feat.shape[1])))
            for feat in self.item_features()
        )

        self.adjacency = to_torch(normalized_adjacency(dataset.train))
        r = sp.csr_matrix(dataset.train, dtype=np.float32)
        self.interactions, self.interactions_t = to_torch(r), to_torch(r.T.tocsr())
        degree = np.asarray(r.sum(axis=1)).ravel()
        inv = np.divide(1.0, degree, out=np.zeros_like(degree), where=degree > 0)
        mean = (sp.diags(inv) @ r).tocsr()
        self.user_mean, self.user_mean_t = to_torch(mean), to_torch(mean.T.tocsr())

    # -- hypergraph ---------------------------------------------------------------------------

    def hyperedge_dependencies(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per modality (item-hyperedge I x A, user-hyperedge U x A), before dropout.

        Gumbel-softmax over the A hyperedges in training (when `gumbel`), plain softmax otherwise.
        """
        out = []
        for feat, edges in zip(self.item_features(), self.hyperedges):
            logits = feat @ edges.T
            if self.training and self.config["gumbel"]:
                items = F.gumbel_softmax(logits, tau=1.0, hard=False, dim=1)
            else:
                items = torch.softmax(logits, dim=1)
            users = sparse_matmul(self.interactions, items, self.interactions_t)
            out.append((items, users))
        return out

    def _drop(self, h: torch.Tensor) -> torch.Tensor:
        return F.dropout(h, p=1.0 - self.config["keep_rate"], training=self.training)

    def global_embeddings(self, item_local: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per modality (users U x d, items I x d) after n_hyper_layers hypergraph layers."""
        out = []
        for h_items, h_users in self.hyperedge_dependencies():
            items, users = item_local, None
            for _ in range(self.config["n_hyper_layers"]):
                edges = self._drop(h_items).T @ items  # A x d hyperedge messages
                users = self._drop(h_users) @ edges
                items = self._drop(h_items) @ edges
            if users is None:  # no hypergraph layer: users have no global signal
                users = torch.zeros(self.n_users, items.shape[1], device=items.device)
            out.append((users, items))
        return out

    # -- forward ------------------------------------------------------------------------------

    def _forward(self):
        """(final users, final items, global embeddings per modality)."""
        cfg = self.config
        ego = torch.cat([self.user_emb, self.item_emb])
        collaborative = torch.stack(propagate(self.adjacency, ego, cfg["n_ui_layers"])).mean(0)
        local = collaborative
        for proj, feat in zip(self.projections, self.item_features()):
            items = proj(feat)
            users = sparse_matmul(self.user_mean, items, self.user_mean_t)
            modal = torch.cat([users, items])
            for _ in range(cfg["n_mm_layers"]):
                modal = sparse_matmul(self.adjacency, modal)
            local = local + F.normalize(modal, dim=1)
        local_users, local_items = local[: self.n_users], local[self.n_users:]
        # Hyperedges spread the collaborative item embeddings (the ID branch's output).
        globals_ = self.global_embeddings(collaborative[self.n_users:])
        g_users = sum(u for u, _ in globals_)
        g_items = sum(i for _, i in globals_)
        users = local_users + cfg["alpha"] * F.normalize(g_users, dim=1)
        items = local_items + cfg["alpha"] * F.normalize(g_items, dim=1)
        return users, items, globals_

    def embed(self):
        users, items, _ = self._forward()
        return users, items

    def loss(self, batch):
        cfg = self.config
        users, items, globals_ = self._forward()
        u = users[batch.users]
        rec = bpr_loss((u * items[batch.pos_items]).sum(1), (u * items[batch.neg_items]).sum(1))
        reg = cfg["reg_weight"] * l2_penalty(
            self.user_emb[batch.users], self.item_emb[batch.pos_items], self.item_emb[batch.neg_items]
        )
        total = rec + reg
        parts = {"bpr": rec.item(), "reg": reg.item()}
        if cfg["cl_weight"] and len(globals_) >= 2:
            uu, ii = torch.unique(batch.users), torch.unique(batch.pos_items)
            pairs = list(itertools.combinations(range(len(globals_)), 2))
            cl = sum(
                info_nce(globals_[a][0][uu], globals_[b][0][uu], cfg["tau"])
                + info_nce(globals_[a][1][ii], globals_[b][1][ii], cfg["tau"])
                for a, b in pairs
            ) / len(pairs)
            total = total + cfg["cl_weight"] * cl
            parts["cl"] = cl.item()
        return total, parts

"""BM3 (Zhou et al., WWW'23): "Bootstrap Latent Representations for Multi-modal Recommendation".

A self-supervised model with NO negative samples and no auxiliary graphs. What the paper does (and
how this file does it):

1. Encoders. User and item ID embeddings are encoded by LightGCN over the normalised user-item
   graph (n_layers layers; readout = mean of layers 0..L, as in LightGCN): h_u, h_i. Each content
   modality m is projected to the same width by a one-layer linear map: h_i^m = x_i^m W_m + b_m.
2. Contrastive view generator. A single predictor f_p (one linear layer, SHARED by users, items
   and every modality) gives the online view  h~ = f_p(h).  The target view is the stop-gradient
   representation perturbed by dropout:  h. = Dropout(sg(h))  (no target network, no graph
   augmentation). Dropout with ratio `dropout` is applied to users, items and modality vectors.
3. Multi-modal contrastive loss, with C(a, b) = - cos(a, b) averaged over the batch's
   (user, positive item) pairs:
     graph reconstruction       L_rec   = C(h~_u, h._i) + C(h._u, h~_i)
     inter-modality alignment   L_align = sum_m C(h~_i^m, h._i)      (modality online -> item ID target)
     intra-modality masking     L_mask  = sum_m C(h~_i^m, h._i^m)    (modality online -> its own target)
   plus reg_weight times the batch L2 (`base.l2_penalty`) of the online embeddings h~_u, h~_i.
   Interpretation: `cl_weight` multiplies the two multi-modal terms,
       L = L_rec + cl_weight * (L_align + L_mask) + reg_weight * L2,
   cl_weight = 1 is the paper's unweighted sum; the default 2.0 is the field's released setting.
4. Inference. Scores are inner products of the ONLINE (predicted) embeddings: embed() returns
   (f_p(h_u), f_p(h_i)) over the full graph, without dropout. Content enters only through training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..graphs import normalized_adjacency, to_torch
from ..config import AT_LEAST_0, AT_LEAST_1, FRACTION
from .base import Recommender, l2_penalty, register
from .lightgcn import propagate


def negative_cosine(online: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-cos(online, target) per row, averaged (the target is already detached)."""
    return -F.cosine_similarity(online, target, dim=-1).mean()


@register
class BM3(Recommender):
    name = "bm3"
    needs_features = True
    uses_negatives = False
    defaults = {
        "embedding_size": 64,
        "lr": 1e-3,
        "n_layers": 1,
        "dropout": 0.5,
        "reg_weight": 0.1,
        "cl_weight": 2.0,
    }
    bounds = {
        "embedding_size": AT_LEAST_1, "n_layers": AT_LEAST_0, "dropout": FRACTION,
        "reg_weight": AT_LEAST_0, "cl_weight": AT_LEAST_0,
    }
    key_help = {
        "embedding_size": "embedding width",
        "n_layers": "LightGCN layers over the user-item graph",
        "dropout": "dropout ratio of the target views",
        "reg_weight": "weight of the L2 penalty on the online embeddings",
        "cl_weight": "weight of the inter- and intra-modality alignment terms",
    }
    search_space = {"n_layers": [1, 2], "dropout": [0.3, 0.5], "reg_weight": [0.1, 0.01]}

    def __init__(self, dataset, config):
        super().__init__(dataset, config)
        d = config["embedding_size"]
        self.user_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_users, d)))
        self.item_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_items, d)))
        self.add_modality_projections(dataset, d)
        self.predictor = nn.Linear(d, d)
        self.register_buffer("adjacency", to_torch(normalized_adjacency(dataset.train)), persistent=False)

    def _encode(self):
        ego = torch.cat([self.user_emb, self.item_emb])
        out = torch.stack(propagate(self.adjacency, ego, self.config["n_layers"])).mean(0)
        return out[: self.n_users], out[self.n_users:]

    def _target(self, h: torch.Tensor) -> torch.Tensor:
        return F.dropout(h.detach(), p=self.config["dropout"], training=True)

    def loss(self, batch):
        cfg = self.config
        users, items = self._encode()
        h_u, h_i = users[batch.users], items[batch.pos_items]
        on_u, on_i = self.predictor(h_u), self.predictor(h_i)
        tg_u, tg_i = self._target(h_u), self._target(h_i)
        rec = negative_cosine(on_u, tg_i) + negative_cosine(tg_u, on_i)

        align = mask = torch.zeros((), device=h_u.device)
        for proj, feat in zip(self.projections, self.item_features()):
            h_m = proj(feat[batch.pos_items])
            on_m = self.predictor(h_m)
            align = align + negative_cosine(on_m, tg_i)
            mask = mask + negative_cosine(on_m, self._target(h_m))

        reg = cfg["reg_weight"] * l2_penalty(on_u, on_i)
        total = rec + cfg["cl_weight"] * (align + mask) + reg
        return total, {"rec": rec.item(), "align": align.item(), "mask": mask.item(), "reg": reg.item()}

    def embed(self):
        users, items = self._encode()
        return self.predictor(users), self.predictor(items)

"""BM3 (Zhou et al., WWW'23): "Bootstrap Latent Representations for Multi-modal Recommendation".

A self-supervised model with NO negative samples and no auxiliary graphs. It follows the
mechanisms of the reference implementation (MMRec `src/models/bm3.py`, `configs/model/BM3.yaml`),
read mechanism by mechanism and re-written here; no code was copied. Lines checked (MMRec commit
e775373, `src/models/bm3.py`): encoder 84-95, projections and predictor 44-56, targets 106-119,
loss 121-147 (regulariser: `src/common/loss.py` 38-51).

1. Encoders. User and item ID embeddings are encoded by LightGCN over the normalised user-item
   graph (n_layers layers; readout = mean of layers 0..L): h_u; the item vector ADDS the item's
   own ID embedding to that readout (a residual): h_i = LightGCN_i + e_i. Each content modality m
   is projected to the same width by a linear layer: h_i^m = x_i^m W_m + b_m; the raw features
   x^m are trainable (initialised from the dataset's feature files).
2. Views. A single predictor f_p (one linear layer, SHARED by users, items and every modality)
   gives the online view h~ = f_p(h). The target view is the stop-gradient representation
   perturbed by dropout (ratio `dropout`, over the whole tables): h. = Dropout(sg(h)).
3. Loss, with C(a, b) = 1 - cos(a, b) averaged over the batch's (user, positive item) pairs:
     graph reconstruction       L_rec   = C(h~_u, h._i) + C(h~_i, h._u)
     inter-modality alignment   L_align = sum_m C(h~_i^m, h._i)      (modality online -> item target)
     intra-modality masking     L_mask  = sum_m C(h~_i^m, h._i^m)    (modality online -> its own target)
       L = L_rec + cl_weight * (L_align + L_mask)
           + reg_weight * (||H_u|| + ||H_i||) / n_items
   where H_u, H_i are the WHOLE encoder tables (before the predictor) and ||.|| the Frobenius norm,
   not squared (`base.embedding_norm_penalty`).
4. Initialisation: ID tables xavier-uniform; predictor and modality projections xavier-normal
   weights (default bias). Inference scores inner products of the online embeddings
   (f_p(h_u), f_p(h_i)) over the full graph, without dropout. Content enters only through training.

Defaults are the reference yaml's first configuration (n_layers 1, dropout 0.3, reg_weight 0.1,
cl_weight 2.0). With one modality the sums in L_align and L_mask have one term (the reference
handles image and/or text the same way).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..graphs import normalized_adjacency, to_torch
from ..config import AT_LEAST_0, AT_LEAST_1, FRACTION
from .base import Recommender, embedding_norm_penalty, register
from .lightgcn import propagate


def cosine_distance(online: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - cos(online, target) per row, averaged (the target is already detached)."""
    return 1.0 - F.cosine_similarity(online, target, dim=-1).mean()


@register
class BM3(Recommender):
    name = "bm3"
    needs_features = True
    uses_negatives = False
    defaults = {
        "embedding_size": 64,
        "lr": 1e-3,
        "epochs": 1000,  # the reference trainer's cap (MMRec); early stopping ends runs long before
        "n_layers": 1,
        "dropout": 0.3,
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
        "reg_weight": "weight of the norm penalty (not squared) on the whole encoder tables, / items",
        "cl_weight": "weight of the inter- and intra-modality alignment terms",
    }
    search_space = {"n_layers": [1, 2], "dropout": [0.3, 0.5], "reg_weight": [0.1, 0.01]}

    def __init__(self, dataset, config):
        super().__init__(dataset, config)
        d = config["embedding_size"]
        self.user_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_users, d)))
        self.item_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_items, d)))
        # The raw features are parameters here: the reference fine-tunes them.
        self.features = nn.ParameterList(
            nn.Parameter(torch.from_numpy(dataset.features_for_model(name, trained=True)))
            for name in dataset.modalities
        )
        self.projections = nn.ModuleList(nn.Linear(f.shape[1], d) for f in self.features)
        self.predictor = nn.Linear(d, d)
        for layer in [self.predictor, *self.projections]:
            nn.init.xavier_normal_(layer.weight)
        self.register_buffer("adjacency", to_torch(normalized_adjacency(dataset.train)), persistent=False)

    def encode(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(users, items) before the predictor; items carry their ID embedding as a residual."""
        ego = torch.cat([self.user_emb, self.item_emb])
        out = torch.stack(propagate(self.adjacency, ego, self.config["n_layers"])).mean(0)
        return out[: self.n_users], out[self.n_users:] + self.item_emb

    def _target(self, h: torch.Tensor) -> torch.Tensor:
        return F.dropout(h.detach(), p=self.config["dropout"], training=True)

    def loss(self, batch):
        cfg = self.config
        users, items = self.encode()
        on_u, on_i = self.predictor(users[batch.users]), self.predictor(items[batch.pos_items])
        tg_u, tg_i = self._target(users)[batch.users], self._target(items)[batch.pos_items]
        rec = cosine_distance(on_u, tg_i) + cosine_distance(on_i, tg_u)

        align = mask = torch.zeros((), device=users.device)
        for proj, feat in zip(self.projections, self.features):
            h_m = proj(feat)
            on_m = self.predictor(h_m[batch.pos_items])
            align = align + cosine_distance(on_m, tg_i)
            mask = mask + cosine_distance(on_m, self._target(h_m)[batch.pos_items])

        reg = cfg["reg_weight"] * embedding_norm_penalty(users, items)
        total = rec + cfg["cl_weight"] * (align + mask) + reg
        return total, {"rec": rec.item(), "align": align.item(), "mask": mask.item(), "reg": reg.item()}

    def embed(self):
        users, items = self.encode()
        return self.predictor(users), self.predictor(items)

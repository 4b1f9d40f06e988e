"""VBPR (He & McAuley, AAAI'16): BPR-MF whose items also carry a learned projection of their content.

The paper scores a user-item pair as

    x_ui = alpha + beta_u + beta_i + gamma_u . gamma_i + theta_u . (E f_i) + beta' . f_i

where gamma_u, gamma_i are latent ID factors, f_i is the item's (visual) content feature, E is a
learned linear map from the feature space into a small "visual" space, and theta_u is the user's
preference vector in that space. It is trained with the BPR loss plus L2 regularisation.

This file follows the reference implementation the field's figures come from (MMRec's
`src/models/vbpr.py`, `configs/model/VBPR.yaml`), mechanism by mechanism; no code was copied
(lines checked at MMRec commit e775373: widths 27-32, content layer 33-45, scores 69-75 and
89-106, penalty 96):

* Score = gamma_u . gamma_i + theta_u . (E f_i + b): an inner product of a user vector
  [gamma_u, theta_u] and an item vector [gamma_i, E f_i + b], which is what `embed()` returns.
  The paper's scalar biases are not there; the content layer has a bias vector b.
* Widths: `embedding_size` d is the width of EACH part: users are 2d wide (one xavier-uniform
  table, its first d columns gamma_u, its last d theta_u), items d of ID factors (xavier-uniform)
  plus d of content; 64 + 64 by default.
* f_i is the concatenation of ALL the dataset's content modalities (in the dataset's order), the
  raw features unchanged and frozen. E is xavier-normal, b starts at 0.
* Regulariser: reg_weight times the Frobenius norms (NOT squared) of the batch's whole user vectors
  [gamma_u, theta_u] and positive and negative item vectors [gamma_i, E f_i + b], [gamma_j, E f_j + b],
  over the batch (`base.embedding_norm_penalty`, MMRec's EmbLoss). Default 2.0: the first value of
  the reference grid.
* `score_parts` returns the ID part and the content part of the score separately; they sum to the
  full score.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..config import AT_LEAST_0, AT_LEAST_1
from .base import Recommender, bpr_loss, embedding_norm_penalty, register


def concatenated_features(dataset) -> torch.Tensor:
    """All modalities' item features side by side (items x sum of widths), float32."""
    return torch.from_numpy(
        np.concatenate([np.asarray(f, dtype=np.float32) for f in dataset.features.values()], axis=1)
    )


@register
class VBPR(Recommender):
    name = "vbpr"
    needs_features = True
    defaults = {"embedding_size": 64, "lr": 1e-3, "epochs": 1000, "reg_weight": 2.0}
    bounds = {"embedding_size": AT_LEAST_1, "reg_weight": AT_LEAST_0}
    key_help = {
        "embedding_size": "width of the item ID factors and of the content factors (users: both, 2x)",
        "reg_weight": "weight of the norm penalty (not squared) on the batch's user and item vectors",
    }
    search_space = {"reg_weight": [2.0, 1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5]}

    def __init__(self, dataset, config):
        super().__init__(dataset, config)
        d = config["embedding_size"]
        # One 2d-wide user table, as the reference draws it (xavier bounds depend on the width).
        users = nn.init.xavier_uniform_(torch.empty(self.n_users, 2 * d))
        self.user_id = nn.Parameter(users[:, :d].clone())  # gamma_u
        self.user_content = nn.Parameter(users[:, d:].clone())  # theta_u
        self.item_id = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_items, d)))  # gamma_i
        features = concatenated_features(dataset)
        # Data, not parameters: rebuilt from the dataset, so not saved in checkpoints.
        self.register_buffer("features", features, persistent=False)
        self.projection = nn.Linear(features.shape[1], d)  # E, b
        nn.init.xavier_normal_(self.projection.weight)
        nn.init.zeros_(self.projection.bias)
        self.modalities = dataset.modalities
        self.modality_widths = [f.shape[1] for f in dataset.features.values()]  # f's column blocks

    def item_content(self, items: torch.Tensor | None = None) -> torch.Tensor:
        """E f_i + b for `items` (all items when None)."""
        feats = self.features if items is None else self.features[items]
        return self.projection(feats)

    def score_parts(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ID part gamma_u . gamma_i, content part theta_u . E f_i), each len(users) x len(items)."""
        id_part = self.user_id[users] @ self.item_id[items].T
        content_part = self.user_content[users] @ self.item_content(items).T
        return id_part, content_part

    def loss(self, batch):
        g_u, t_u = self.user_id[batch.users], self.user_content[batch.users]
        g_i, g_j = self.item_id[batch.pos_items], self.item_id[batch.neg_items]
        c_i, c_j = self.item_content(batch.pos_items), self.item_content(batch.neg_items)
        pos = (g_u * g_i).sum(1) + (t_u * c_i).sum(1)
        neg = (g_u * g_j).sum(1) + (t_u * c_j).sum(1)
        rec = bpr_loss(pos, neg)
        reg = self.config["reg_weight"] * embedding_norm_penalty(
            torch.cat([g_u, t_u], 1), torch.cat([g_i, c_i], 1), torch.cat([g_j, c_j], 1)
        )
        return rec + reg, {"bpr": rec.item(), "reg": reg.item()}

    def embed(self):
        users = torch.cat([self.user_id, self.user_content], dim=1)
        items = torch.cat([self.item_id, self.item_content()], dim=1)
        return users, items

    # -- serving: explanations and cold-start items (used by fitmm.api, never by training) -----

    def _content_parts(self, feats: torch.Tensor) -> torch.Tensor:
        """(n x (C+1) x d): E_m f_m per modality m (E_m = E's columns of modality m), then the
        content layer's bias b; they sum to E f + b."""
        widths = self.modality_widths
        w = self.projection.weight  # (d x sum of widths)
        blocks = zip(feats.split(widths, dim=1), w.split(widths, dim=1))
        parts = [f @ e.T for f, e in blocks]
        parts.append(self.projection.bias.expand(len(feats), -1))
        return torch.stack(parts, dim=1)

    @torch.no_grad()
    def explain_parts(self):
        """Users: [gamma_u, theta_u] (U x 2 x d); items: [gamma_i, E_1 f_1, ..., b] (I x (2+C) x d)."""
        users = torch.stack([self.user_id, self.user_content], dim=1)
        items = torch.cat([self.item_id[:, None], self._content_parts(self.features)], dim=1)
        return users, items

    def explain(self, user_part, item_part):
        """modalities: id = gamma_u . gamma_i; modality m = theta_u . E_m f_m; bias = theta_u . b
        (the same for every item); they sum to the score."""
        u, i = user_part.double(), item_part.double()
        parts = [u[0] @ i[0]] + [u[1] @ i[m] for m in range(1, i.shape[0])]
        names = ["id", *self.modalities, "bias"]
        return {"score": float(sum(parts)), "modalities": {n: float(c) for n, c in zip(names, parts)}}

    @torch.no_grad()
    def cold_items(self, dataset, features):
        """A new item: no ID factors (zero), its content through E and b."""
        feats = torch.cat([torch.as_tensor(features[m], dtype=torch.float32) for m in self.modalities], dim=1)
        content = self._content_parts(feats.to(self.features.device))
        parts = torch.cat([content.new_zeros(content.shape[0], 1, content.shape[2]), content], dim=1)
        return torch.cat([parts[:, 0], parts[:, 1:].sum(1)], dim=1), parts

"""VBPR (He & McAuley, AAAI'16): BPR-MF whose items also carry a learned projection of their content.

The paper scores a user-item pair as

    x_ui = alpha + beta_u + beta_i + gamma_u . gamma_i + theta_u . (E f_i) + beta' . f_i

where gamma_u, gamma_i are latent ID factors, f_i is the item's (visual) content feature, E is a
learned linear map from the feature space into a small "visual" space, and theta_u is the user's
preference vector in that space. It is trained with the BPR loss plus L2 regularisation.

What this file does, and the interpretations made:

* Score = gamma_u . gamma_i + theta_u . (E f_i): the bias terms (alpha, beta_u, beta_i, beta') are
  dropped, as in the common "64-d embedding" formulation of the baseline. Then the model is an
  inner product of a user vector [gamma_u, theta_u] and an item vector [gamma_i, E f_i], which is
  what `embed()` returns (default dot-product `score`).
* `embedding_size` is the TOTAL width: half ID factors, half content space (32 + 32 by default).
* f_i is the concatenation of ALL the dataset's content modalities (in the dataset's order), the raw
  features unchanged (float32). E is a bias-free linear layer (the paper's E has no bias).
* Regulariser as the field's reference (MMRec `src/models/vbpr.py`): reg_weight times the Frobenius
  norms (NOT squared) of the batch's whole user vectors [gamma_u, theta_u], positive and negative
  item vectors [gamma_i, E f_i], [gamma_j, E f_j], over the batch (`base.embedding_norm_penalty`).
* `score_parts` returns the ID part and the content part of the score separately; they sum to the
  full score.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..config import AT_LEAST_0, Bound
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
    defaults = {"embedding_size": 64, "lr": 1e-3, "reg_weight": 1e-4}
    bounds = {"embedding_size": Bound(low=2), "reg_weight": AT_LEAST_0}
    key_help = {
        "embedding_size": "width of the ID factors plus the content factors (half each; even)",
        "reg_weight": "weight of the norm penalty (not squared) on the batch's user and item vectors",
    }
    search_space = {"reg_weight": [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]}

    @classmethod
    def check(cls, dataset, config):
        super().check(dataset, config)
        d = config["embedding_size"]
        if d < 2 or d % 2:
            raise InputError(
                f"config key 'embedding_size': vbpr splits it in half (ID factors + content factors), "
                f"so it must be an even number >= 2, got {d}"
            )

    def __init__(self, dataset, config):
        super().__init__(dataset, config)
        half = config["embedding_size"] // 2
        self.user_id = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_users, half)))  # gamma_u
        self.item_id = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_items, half)))  # gamma_i
        self.user_content = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_users, half)))  # theta_u
        features = concatenated_features(dataset)
        # Data, not parameters: rebuilt from the dataset, so not saved in checkpoints.
        self.register_buffer("features", features, persistent=False)
        self.projection = nn.Linear(features.shape[1], half, bias=False)  # E
        self.modalities = dataset.modalities
        self.modality_widths = [f.shape[1] for f in dataset.features.values()]  # f's column blocks

    def item_content(self, items: torch.Tensor | None = None) -> torch.Tensor:
        """E f_i for `items` (all items when None)."""
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
        """(n x C x half): E_m f_m per modality m, E_m = E's columns of modality m; they sum to E f."""
        widths = self.modality_widths
        w = self.projection.weight  # (half x sum of widths)
        blocks = zip(feats.split(widths, dim=1), w.split(widths, dim=1))
        return torch.stack([f @ e.T for f, e in blocks], dim=1)

    @torch.no_grad()
    def explain_parts(self):
        """Users: [gamma_u, theta_u] (U x 2 x half); items: [gamma_i, E_1 f_1, ...] (I x (1+C) x half)."""
        users = torch.stack([self.user_id, self.user_content], dim=1)
        items = torch.cat([self.item_id[:, None], self._content_parts(self.features)], dim=1)
        return users, items

    def explain(self, user_part, item_part):
        """modalities: id = gamma_u . gamma_i; modality m = theta_u . E_m f_m; they sum to the score."""
        u, i = user_part.double(), item_part.double()
        parts = [u[0] @ i[0]] + [u[1] @ i[m] for m in range(1, i.shape[0])]
        names = ["id", *self.modalities]
        return {"score": float(sum(parts)), "modalities": {n: float(c) for n, c in zip(names, parts)}}

    @torch.no_grad()
    def cold_items(self, dataset, features):
        """A new item: no ID factors (zero), its content through E."""
        feats = torch.cat([torch.as_tensor(features[m], dtype=torch.float32) for m in self.modalities], dim=1)
        content = self._content_parts(feats.to(self.features.device))
        parts = torch.cat([content.new_zeros(content.shape[0], 1, content.shape[2]), content], dim=1)
        return torch.cat([parts[:, 0], parts[:, 1:].sum(1)], dim=1), parts

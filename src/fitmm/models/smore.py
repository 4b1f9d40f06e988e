"""SMORE (Ong & Khong, WSDM'25): spectrum-based modality representation fusion GCN.

Written from the paper's description ("Spectrum-based Modality Representation Fusion Graph
Convolutional Network for Multimodal Recommendation"); no code was taken from the authors' or
MMRec's implementation.

Pipeline (top to bottom in `_views`):

1. Spectrum modality fusion. Each modality's (frozen) item features are projected to d dims
   (a linear layer), transformed with a real FFT along the embedding dimension, and filtered
   by a learnable complex response per modality (the denoising filter). The filtered spectrum
   is brought back with the inverse FFT: the uni-modal representation of that modality. The
   fused representation multiplies the filtered spectra of all modalities (a point-wise product
   in frequency = a circular convolution in the embedding domain) and applies a learnable
   fusion filter before the inverse FFT. See `spectral_filter` and `spectral_fusion`.
2. Multi-modal graph learning. One item-item kNN graph per modality, built on the raw
   features (cosine top-k, self included), and a fused graph (element-wise max of the
   modality graphs, i.e. the union of the neighbour sets). Each graph is binarised and
   normalised D^-1/2 A D^-1/2 (D: row degrees). Uni-modal representations propagate over
   their modality's graph, the fused one over the fused graph (n_mm_layers layers, last layer
   kept); users get each view by aggregating their items' representations over the
   normalised user-item graph.
   Behaviour view: LightGCN over the user-item graph on ID embeddings (n_ui_layers, mean of
   the layer outputs, layer 0 included).
3. Modality-aware preference. A sigmoid gate per view, computed from the node's behaviour (ID)
   embedding, g_v = sigmoid(W_v e_id + b_v), scales that view's representation. The
   multimodal representation is the mean of the gated uni-modal views plus the gated fused
   view; the final embedding is e_id + h_mm.
4. Loss: BPR + cl_weight * InfoNCE(behaviour view, multimodal view; temperature tau) over the
   batch's distinct users and distinct positive items (other rows of the batch are the
   negatives) + reg_weight * L2 of the batch's ego ID embeddings.

Interpretations (where the paper leaves room, or where this library generalises it):
- Modalities: any number >= 1. The kNN size is `image_knn_k` for a modality named 'image'
  and `text_knn_k` for every other modality. With one modality the "fusion" is that
  modality's filtered spectrum times the fusion filter, over the same graph.
- Filters are initialised all-pass (response 1), so training starts from the unfiltered
  projections; the FFTs use orthonormal scaling, so an all-pass filter is exactly the
  identity.
- `dropout` is applied to the uni-modal and fused representations right after the inverse FFT
  (training only).
- The fused graph is the element-wise max (union of neighbour sets) of the modality graphs.
- Raw features are fixed (not fine-tuned); only the projections learn.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from ..config import AT_LEAST_0, AT_LEAST_1, FRACTION, POSITIVE, cache_dir
from ..errors import InputError
from ..graphs import normalized_adjacency, sparse_matmul, to_torch
from ..knn import cached_mixed_knn_graph
from .base import Recommender, bpr_loss, l2_penalty, register
from .lightgcn import propagate


# -- frequency-domain pieces ------------------------------------------------------------------


def _as_complex(weights: torch.Tensor) -> torch.Tensor:
    """A complex response, given complex or as a real (..., 2) [real, imag] tensor."""
    if weights.is_complex():
        return weights
    if weights.shape[-1] != 2:
        raise ValueError(f"a real filter response must have a trailing dimension of 2 (real, imag); got {tuple(weights.shape)}")
    return torch.view_as_complex(weights.contiguous())


def spectral_filter(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Filter the rows of x (..., d) in the frequency domain of its last dimension.

    rfft along the last dim (orthonormal), multiply by the complex response `weights`
    (d // 2 + 1 frequencies; complex, or real with a trailing [real, imag] dim of 2), irfft
    back to d. An all-ones response returns x unchanged.
    """
    d = x.shape[-1]
    w = _as_complex(weights)
    if w.shape[-1] != d // 2 + 1:
        raise ValueError(f"filter has {w.shape[-1]} frequencies; a signal of length {d} has {d // 2 + 1}")
    return torch.fft.irfft(torch.fft.rfft(x, dim=-1, norm="ortho") * w, n=d, dim=-1, norm="ortho")


def spectral_fusion(xs: list[torch.Tensor], filters: list[torch.Tensor], fusion_weights: torch.Tensor):
    """(filtered x per modality, fused x) from the same filtered spectra.

    Uni-modal: irfft(W_m * rfft(x_m)). Fused: irfft(W_f * prod_m W_m * rfft(x_m)).
    """
    d = xs[0].shape[-1]
    spectra = [torch.fft.rfft(x, dim=-1, norm="ortho") * _as_complex(w) for x, w in zip(xs, filters)]
    uni = [torch.fft.irfft(s, n=d, dim=-1, norm="ortho") for s in spectra]
    fused = spectra[0]
    for s in spectra[1:]:
        fused = fused * s
    fused = torch.fft.irfft(fused * _as_complex(fusion_weights), n=d, dim=-1, norm="ortho")
    return uni, fused


def all_pass(d: int) -> torch.Tensor:
    """The all-pass response for length-d signals, as a real (d // 2 + 1, 2) tensor."""
    w = torch.zeros(d // 2 + 1, 2)
    w[:, 0] = 1.0
    return w


# -- graphs -----------------------------------------------------------------------------------


def sym_normalize(a: sp.spmatrix) -> sp.csr_matrix:
    """D^-1/2 A D^-1/2 of the binarised A (D: row degrees); zero rows stay zero."""
    a = sp.csr_matrix(a, dtype=np.float32, copy=True)
    a.data[:] = 1.0
    a.eliminate_zeros()
    degree = np.asarray(a.sum(axis=1)).ravel()
    inv = np.zeros_like(degree)
    inv[degree > 0] = degree[degree > 0] ** -0.5
    out = (sp.diags(inv) @ a @ sp.diags(inv)).tocsr().astype(np.float32)
    out.sort_indices()
    return out


def modality_k(name: str, config) -> int:
    return config["image_knn_k"] if name == "image" else config["text_knn_k"]


def info_nce(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """InfoNCE between matching rows of a and b (cosine similarity / tau; other rows are negatives)."""
    a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    logits = a @ b.T / tau
    return F.cross_entropy(logits, torch.arange(len(a), device=a.device))


@register
class SMORE(Recommender):
    name = "smore"
    needs_features = True
    graph_attributes = ("adjacency", "user_item", "user_item_t")
    defaults = {
        "embedding_size": 64,
        "lr": 1e-3,
        "n_ui_layers": 4,
        "n_mm_layers": 1,
        "image_knn_k": 40,
        "text_knn_k": 15,
        "reg_weight": 1e-4,
        "dropout": 0.1,
        "cl_weight": 0.01,
        "tau": 0.2,
    }
    bounds = {
        "embedding_size": AT_LEAST_1, "n_ui_layers": AT_LEAST_0, "n_mm_layers": AT_LEAST_0,
        "image_knn_k": AT_LEAST_1, "text_knn_k": AT_LEAST_1, "reg_weight": AT_LEAST_0, "dropout": FRACTION,
        "cl_weight": AT_LEAST_0, "tau": POSITIVE,
    }
    key_help = {
        "embedding_size": "embedding width",
        "n_ui_layers": "LightGCN layers over the user-item graph (behaviour view)",
        "n_mm_layers": "item-item graph layers for the modality and fused views",
        "image_knn_k": "kNN size of the 'image' modality graph (at most the number of items)",
        "text_knn_k": "kNN size of every other modality's graph (at most the number of items)",
        "reg_weight": "weight of the L2 penalty",
        "dropout": "dropout of the uni-modal and fused representations (training only)",
        "cl_weight": "weight of the contrastive term",
        "tau": "temperature of the contrastive term",
    }
    search_space = {
        "n_ui_layers": [3, 4],
        "image_knn_k": [10, 15, 20, 40],
        "text_knn_k": [10, 15, 20, 40],
        "reg_weight": [1e-5, 1e-4],
        "dropout": [0.0, 0.1],
    }

    @classmethod
    def check(cls, dataset, config):
        super().check(dataset, config)
        for name in dataset.modalities:
            key = "image_knn_k" if name == "image" else "text_knn_k"
            if config[key] > dataset.n_items:
                raise InputError(
                    f"config key '{key}' (kNN size of modality '{name}'): must be at most the number "
                    f"of items ({dataset.n_items}), got {config[key]}"
                )

    def __init__(self, dataset, config):
        super().__init__(dataset, config)
        d = config["embedding_size"]
        self.modalities = dataset.modalities
        self.user_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_users, d)))
        self.item_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_items, d)))
        self.add_modality_projections(dataset, d)
        # Complex responses stored as real (d//2+1, 2) tensors, initialised all-pass.
        self.filters = nn.ParameterList(nn.Parameter(all_pass(d)) for _ in self.modalities)
        self.fusion_filter = nn.Parameter(all_pass(d))
        self.dropout = nn.Dropout(config["dropout"])
        n_views = len(self.modalities) + 1  # uni-modal views, then the fused view
        self.gates = nn.ModuleList(nn.Linear(d, d) for _ in range(n_views))

        # Fixed graphs (plain attributes, moved in _apply; rebuilt from the data, not saved).
        adjacency = normalized_adjacency(dataset.train)
        self.adjacency = to_torch(adjacency)
        ui = adjacency[: self.n_users, self.n_users:].tocsr()  # normalised user-item block
        self.user_item, self.user_item_t = to_torch(ui), to_torch(ui.T.tocsr())
        folder = cache_dir(config)
        modal = []
        for name in self.modalities:
            knn = cached_mixed_knn_graph(
                {name: dataset.features[name]}, modality_k(name, config), {name: 1.0}, dataset.fingerprint, folder
            )
            modal.append(sym_normalize(knn))
        fused = modal[0]
        for g in modal[1:]:
            fused = fused.maximum(g)
        self.item_graphs = []
        for g in [*modal, sym_normalize(fused)]:
            self.item_graphs.append((to_torch(g), to_torch(g.T.tocsr())))

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self.item_graphs = [(fn(a), fn(a_t)) for a, a_t in self.item_graphs]  # one pair per modality
        return out

    # -- 1-3: views ---------------------------------------------------------------------------

    def spectral_views(self) -> list[torch.Tensor]:
        """Item representations per view (I x d): the filtered modalities, then the fused one."""
        projected = [proj(feat) for proj, feat in zip(self.projections, self.item_features())]
        uni, fused = spectral_fusion(projected, list(self.filters), self.fusion_filter)
        return [self.dropout(x) for x in (*uni, fused)]

    def _views(self):
        """(behaviour view, multimodal view), each (U + I) x d, users first."""
        ego = torch.cat([self.user_emb, self.item_emb])
        behaviour = torch.stack(propagate(self.adjacency, ego, self.config["n_ui_layers"])).mean(0)
        multimodal = 0
        views = self.spectral_views()
        n_uni = len(views) - 1
        for v, (h, (graph, graph_t), gate) in enumerate(zip(views, self.item_graphs, self.gates)):
            for _ in range(self.config["n_mm_layers"]):
                h = sparse_matmul(graph, h, graph_t)
            h = torch.cat([sparse_matmul(self.user_item, h, self.user_item_t), h])
            gated = torch.sigmoid(gate(behaviour)) * h
            multimodal = multimodal + (gated / n_uni if v < n_uni else gated)
        return behaviour, multimodal

    def embed(self):
        behaviour, multimodal = self._views()
        out = behaviour + multimodal
        return out[: self.n_users], out[self.n_users:]

    # -- 4: loss ------------------------------------------------------------------------------

    def loss(self, batch):
        cfg = self.config
        behaviour, multimodal = self._views()
        out = behaviour + multimodal
        users, items = out[: self.n_users], out[self.n_users:]
        u = users[batch.users]
        rec = bpr_loss((u * items[batch.pos_items]).sum(1), (u * items[batch.neg_items]).sum(1))
        reg = cfg["reg_weight"] * l2_penalty(
            self.user_emb[batch.users], self.item_emb[batch.pos_items], self.item_emb[batch.neg_items]
        )
        total = rec + reg
        parts = {"bpr": rec.item(), "reg": reg.item()}
        if cfg["cl_weight"]:
            uu = torch.unique(batch.users)
            ii = torch.unique(batch.pos_items) + self.n_users
            cl = info_nce(behaviour[uu], multimodal[uu], cfg["tau"]) + info_nce(behaviour[ii], multimodal[ii], cfg["tau"])
            total = total + cfg["cl_weight"] * cl
            parts["cl"] = cl.item()
        return total, parts

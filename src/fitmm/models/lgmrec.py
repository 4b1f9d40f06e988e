"""LGMRec (Guo et al., AAAI'24): local and global graph learning for multimodal recommendation.

Follows the mechanisms of the reference implementation (MMRec `src/models/lgmrec.py`, from the
authors' repository, and its `configs/model/LGMRec.yaml`), read mechanism by mechanism and
re-written here; no code was copied. Lines checked (MMRec commit e775373, `src/models/lgmrec.py`):
collaborative branch 70-100, modality branch 103-113, local 131-137, hyperedges 117-126,
hypergraph 139-143 and 202-214, final 145, loss 153-192 (contrastive 159-166 and 188);
docs/fidelity.md maps every mechanism to its lines.

1. Local graph embeddings (decoupled):
   - collaborative: LightGCN over the normalised user-item graph on ID embeddings
     (n_ui_layers; mean of the layer outputs, layer 0 included);
   - per modality: item rows are a bias-free linear map of the (frozen) item features, user rows
     the mean of their training items' rows; the pair propagates over the same user-item graph
     (n_mm_layers; the last layer is kept).
   Local embedding = collaborative + sum_m L2-normalise(modality embedding).
2. Global hypergraph embeddings: per modality, hyper_num learnable hyperedges V^m living in the
   feature space. Item logits X^m V^m^T; user logits = R X^m V^m^T (R: binary training
   interactions, so a user's logits are the SUM of its items' logits). Both are turned into
   hyperedge assignments by a Gumbel-softmax with temperature `tau` (0.2), in training AND at
   evaluation, as the reference does. Each assignment matrix is dropped out once per forward
   pass (keep probability keep_rate, kept entries scaled by 1/keep_rate; training only), and the
   same masked matrices serve every hypergraph layer. n_hyper_layers layers start from the
   collaborative item embeddings:
       E_i <- H_i (H_i^T E_i),   E_u <- H_u (H_i^T E_i)
   Global embedding = sum over modalities.
3. Final embedding = local + alpha * L2-normalise(global).
4. Loss: BPR on the final embeddings
       + cl_weight * contrastive term + reg_weight * `embedding_norm_penalty` (Frobenius norms,
         not squared, / batch) of the batch's FINAL user, positive and negative embeddings.
   The contrastive term is InfoNCE (temperature tau) from the image modality's global embedding
   to the other's, for every row of the batch (users; positive items), against ALL users
   (all items) as candidates, SUMMED over the rows: its size is comparable with the BPR term at
   cl_weight 1e-4.

Deliberate differences:
- Evaluation draws its Gumbel noise from a generator seeded with the config's seed, so that
  `embed()` gives the same vectors every time (the reference draws fresh noise per evaluation).
- Any number of modalities >= 1: with more than two, the contrastive term is averaged over the
  pairs (anchor, each other modality); with one it is 0 (the reference needs exactly two).
- `gumbel: false` replaces the Gumbel-softmax by a plain softmax (an ablation; not in the reference).

The contrastive term's direction follows the reference (line 188): InfoNCE is not symmetric (its
denominator sums over the candidate view), and the reference always anchors on its "v" (image)
modality with the "t" modality's embeddings as positives and candidates. Ours anchors on the
modality named 'image' whatever the dataset's order (tiktok_mmssl sorts as audio, image; running
audio -> image there, as before 2026-11-28, put LGMRec at 76% of the reference), or on the first
modality when none is named 'image'.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..graphs import normalized_adjacency, sparse_matmul, to_torch
from ..config import AT_LEAST_0, AT_LEAST_1, Bound, POSITIVE
from .base import Recommender, bpr_loss, embedding_norm_penalty, register
from .lightgcn import propagate


def gumbel_softmax(logits: torch.Tensor, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """softmax((logits + g) / tau) over the last axis, g ~ Gumbel(0, 1) drawn from `generator`
    (torch's global generator when None)."""
    noise = -torch.empty_like(logits).exponential_(generator=generator).log()
    return torch.softmax((logits + noise) / tau, dim=-1)


# Above this 1/tau, exp of a cosine / tau could overflow float32 once summed over the candidates:
# contrastive_sum then falls back to torch.logsumexp, which shifts by each row's maximum.
_BOUNDED_EXP_MAX = 30.0


class _CosineLogSumExp(torch.autograd.Function):
    """Row-wise log sum_j exp(a_r . c_j) for logits bounded by |a_r . c_j| <= 30, in 3 passes over
    the rows x candidates matrix (product, exp in place, row sums) and 1 more in backward.

    With unit vectors the logits are cosines / tau, so for tau >= 1/30 every exp lies in
    [e^-30, e^30] and the sums cannot overflow: the max-shift of torch.logsumexp (and its extra
    passes, with autograd's own ~6 in backward) is not needed. Against ALL users as candidates
    (LGMRec's contrastive term) this matrix is batch x users, ~76 MB on TikTok: those passes
    were most of an LGMRec step."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        e = torch.mm(a, c.t()).exp_()
        total = e.sum(dim=1)
        ctx.save_for_backward(a, c, e, total)
        return total.log()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        a, c, e, total = ctx.saved_tensors
        p = e * (grad / total).unsqueeze(1)  # softmax rows x upstream; not in place: e may be reused
        return p @ c, p.t() @ a


def contrastive_sum(anchors: torch.Tensor, positives: torch.Tensor, candidates: torch.Tensor, tau: float,
                    counts: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over rows r of -log( exp(cos(a_r, p_r)/tau) / sum_j exp(cos(a_r, c_j)/tau) ).

    The candidates c_j are ALL rows of the positive view (the positive itself among them).
    `counts`: row r stands for counts[r] identical batch rows (a batch repeats users and items;
    computing each once and weighting is the same sum from a smaller matrix); None = 1 each."""
    a, p, c = F.normalize(anchors, dim=1), F.normalize(positives, dim=1), F.normalize(candidates, dim=1)
    positive = (a * p).sum(1) / tau
    if 1.0 / tau <= _BOUNDED_EXP_MAX:
        log_total = _CosineLogSumExp.apply(a / tau, c)
    else:
        log_total = torch.logsumexp(a @ c.T / tau, dim=1)
    terms = log_total - positive
    return terms.sum() if counts is None else (terms * counts.to(terms.dtype)).sum()


@register
class LGMRec(Recommender):
    name = "lgmrec"
    needs_features = True
    graph_attributes = ("adjacency", "interactions", "interactions_t", "user_mean", "user_mean_t")
    defaults = {
        "embedding_size": 64,
        "lr": 1e-3,
        "epochs": 1000,  # the reference trainer's cap (MMRec); early stopping ends runs long before
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
        "keep_rate": "keep probability of the hyperedge-assignment dropout (training only)",
        "gumbel": "Gumbel-softmax hyperedge assignments (training and evaluation); plain softmax when false",
        "alpha": "weight of the global (hypergraph) embeddings",
        "cl_weight": "weight of the contrastive term (summed over the batch's rows)",
        "reg_weight": "weight of the norm penalty (not squared) on the batch's final embeddings",
        "tau": "temperature of the Gumbel-softmax and of the contrastive term",
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
        # Frozen features (buffers: data, not saved) and bias-free maps to the embedding width.
        self.projections = nn.ModuleList()
        for m, name in enumerate(dataset.modalities):
            feat = torch.from_numpy(dataset.features_for_model(name))
            self.register_buffer(f"item_features_{m}", feat, persistent=False)
            proj = nn.Linear(feat.shape[1], d, bias=False)
            nn.init.xavier_uniform_(proj.weight)
            self.projections.append(proj)
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

    def _noise_generator(self) -> torch.Generator | None:
        """None in training (the global, seeded stream); at evaluation a generator seeded with the
        config's seed, so that every `embed()` gives the same vectors."""
        if self.training:
            return None
        device = self.user_emb.device
        return torch.Generator(device=device).manual_seed(self.config["seed"])

    def hyperedge_dependencies(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per modality (item assignments I x A, user assignments U x A), before dropout.

        Item logits X V^T; user logits R X V^T (the sum of the user's items' logits); each row
        through a Gumbel-softmax at temperature tau (a plain softmax when `gumbel` is false)."""
        generator = self._noise_generator()
        out = []
        for feat, edges in zip(self.item_features(), self.hyperedges):
            item_logits = feat @ edges.T
            user_logits = sparse_matmul(self.interactions, item_logits, self.interactions_t)
            if self.config["gumbel"]:
                pair = tuple(gumbel_softmax(x, self.config["tau"], generator) for x in (item_logits, user_logits))
            else:
                pair = (torch.softmax(item_logits, dim=1), torch.softmax(user_logits, dim=1))
            out.append(pair)
        return out

    def _drop(self, h: torch.Tensor) -> torch.Tensor:
        return F.dropout(h, p=1.0 - self.config["keep_rate"], training=self.training)

    def global_embeddings(self, item_local: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per modality (users U x d, items I x d) after n_hyper_layers hypergraph layers."""
        out = []
        for h_items, h_users in self.hyperedge_dependencies():
            # One dropout mask per assignment matrix and forward pass, shared by all layers.
            h_items, h_users = self._drop(h_items), self._drop(h_users)
            items, users = item_local, None
            for _ in range(self.config["n_hyper_layers"]):
                edges = h_items.T @ items  # A x d hyperedge messages
                users = h_users @ edges
                items = h_items @ edges
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

    def contrastive_anchor(self) -> int:
        """Index of the modality the contrastive term starts from: 'image' (the reference's "v"),
        else the first."""
        return self.modalities.index("image") if "image" in self.modalities else 0

    def contrastive(self, globals_, batch) -> torch.Tensor:
        """The anchor modality's global embedding -> modality b's, for the batch's users
        (candidates: all users) and positive items (candidates: all items), summed over the batch's
        rows; averaged over the pairs (anchor, each other modality)."""
        tau = self.config["tau"]
        a = self.contrastive_anchor()
        pairs = [(a, b) for b in range(len(globals_)) if b != a]
        users, user_counts = torch.unique(batch.users, return_counts=True)
        items, item_counts = torch.unique(batch.pos_items, return_counts=True)
        return sum(
            contrastive_sum(globals_[a][0][users], globals_[b][0][users], globals_[b][0], tau, user_counts)
            + contrastive_sum(globals_[a][1][items], globals_[b][1][items], globals_[b][1], tau, item_counts)
            for a, b in pairs
        ) / len(pairs)

    def loss(self, batch):
        cfg = self.config
        users, items, globals_ = self._forward()
        u, p, n = users[batch.users], items[batch.pos_items], items[batch.neg_items]
        rec = bpr_loss((u * p).sum(1), (u * n).sum(1))
        reg = cfg["reg_weight"] * embedding_norm_penalty(u, p, n)
        total = rec + reg
        parts = {"bpr": rec.item(), "reg": reg.item()}
        if cfg["cl_weight"] and len(globals_) >= 2:
            cl = self.contrastive(globals_, batch)
            total = total + cfg["cl_weight"] * cl
            parts["cl"] = cl.item()
        return total, parts

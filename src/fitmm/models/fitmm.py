"""FITMM (Yang et al., ACM MM'25): frequency-aware, information-theoretic multimodal recommendation.

Read top to bottom; the spectral pieces (bands, gate, IB, consistency) live in spectral.py, and
`../shared/docs/fitmm-method.md` (sections in brackets below) is the specification.

1. [§3] One LightGCN-style branch per modality: ID, plus one per content modality, whose item
   rows come from an MLP over the item's (by default trainable) raw features. Layer outputs are
   summed.
2. [§4] Base views X_U, X_I (users weighted per modality) and graph-enhanced views: H_I = S X_I
   over the item-item kNN graph, H_U = the users' ego tables (optionally smoothed over a
   user-user kNN graph).
3. [§5-6] Each 64-column modality chunk of each view is split into M orthogonal bands in its own
   singular basis; within-band components Z_b = Band_b(base) + Band_b(enhanced).
4. [§7] A residual gate per node and global band weights fuse the bands: e = Σ_b ω_b g_b Z_b.
5. [§8] Loss = BCE (or BPR) + ib_weight · IB(gates of all users and items)
   + cl_weight · consistency(bands of the batch's users and positive items).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AT_LEAST_0, AT_LEAST_1, POSITIVE, cache_dir
from ..errors import InputError
from ..graphs import normalized_adjacency, sparse_matmul, to_torch
from ..knn import cached_mixed_knn_graph, default_modality_weights, user_knn_graph
from . import spectral
from .base import Recommender, bpr_loss, register


def _band_projectors(x: torch.Tensor, chunk: int, num_bands: int) -> torch.Tensor:
    """Per-modality-chunk band projectors of x (n x D): (C, M, chunk, chunk), from the FULL matrix."""
    n, dim = x.shape
    return spectral.band_projectors(x.reshape(n, dim // chunk, chunk).transpose(0, 1), num_bands)


def _apply_projectors(rows: torch.Tensor, projectors: torch.Tensor) -> torch.Tensor:
    """Bands (M x n x D) of some rows, given projectors computed from the whole matrix."""
    n, dim = rows.shape
    c, m, chunk, _ = projectors.shape
    bands = torch.einsum("nci,cbij->bncj", rows.reshape(n, c, chunk), projectors)
    return bands.reshape(m, n, dim)


@register
class FITMM(Recommender):
    name = "fitmm"
    graph_attributes = ("adjacency", "item_graph", "item_graph_t", "user_graph", "user_graph_t")
    # The authors' released configuration (method spec §9), used for every dataset.
    defaults = {
        "lr": 1e-4,
        "embedding_size": 64,
        "n_layers": 2,
        "n_mm_layers": 1,
        "mlp_hidden": 256,
        "knn_k": 10,
        "modality_weights": {},
        "item_graph": True,
        "user_graph": False,
        "user_knn_k": 10,
        "train_features": True,
        "feature_precision": "float32",
        "num_bands": 3,
        "gate": "pos",
        "gate_scale_init": 0.5,
        "loss": "bce",
        "ib_weight": 1.0,
        "ib_mode": "pos",
        "ib_alpha": 1.0,
        "ib_mu": 1.0,
        "ib_phi": 0.0,
        "consistency": "cross_band",
        "cl_weight": 0.001,
        "cl_tau": 1.0,
    }
    bounds = {
        "embedding_size": AT_LEAST_1, "n_layers": AT_LEAST_0, "n_mm_layers": AT_LEAST_0, "mlp_hidden": AT_LEAST_1,
        "knn_k": AT_LEAST_1, "user_knn_k": AT_LEAST_1, "num_bands": AT_LEAST_1, "gate_scale_init": AT_LEAST_0,
        "ib_weight": AT_LEAST_0, "ib_alpha": AT_LEAST_0, "ib_mu": AT_LEAST_0, "ib_phi": AT_LEAST_0,
        "cl_weight": AT_LEAST_0, "cl_tau": POSITIVE,
    }
    key_help = {
        "embedding_size": "d, the embedding width of each modality branch",
        "n_layers": "LightGCN layers over the user-item graph",
        "n_mm_layers": "item-item graph layers for the enhanced item view",
        "mlp_hidden": "hidden width of the raw-feature MLPs",
        "knn_k": "neighbours per item in the item-item kNN graph (at most the number of items)",
        "modality_weights": "modality -> weight in the item graph; {} = 0.1 image / 0.9 text, else equal",
        "item_graph": "ablation: false drops the enhanced item view H_I",
        "user_graph": "optional user-user kNN graph over mean content features (spec §4)",
        "user_knn_k": "neighbours per user in the user-user graph (at most the number of users)",
        "train_features": "fine-tune the raw item features, as released; false freezes them",
        "feature_precision": "float32 | bfloat16: precision of the raw-feature MLPs' matmuls",
        "num_bands": "M, spectral bands per modality chunk; 1 = no decomposition (ablation)",
        "gate": "pos (sigmoid) | dual (tanh) | off (ablation: all gates 1)",
        "gate_scale_init": "initial scale s of the residual gate g = 1 + s * sigma(...)",
        "loss": "bce (as released) | bpr",
        "ib_weight": "weight of the information-bottleneck term on the gates",
        "ib_mode": "pos: only gate openings above 1 are penalised | dual: both directions",
        "ib_alpha": "IB term: weight of the squared gate opening",
        "ib_mu": "IB term: weight of the sparsity part",
        "ib_phi": "IB term: phi+, the shut-off threshold",
        "consistency": "cross_band (as released) | cross_modal (as the paper words it) | none",
        "cl_weight": "weight of the spectral consistency loss",
        "cl_tau": "temperature of the consistency loss",
    }
    # What `fitmm search` tunes (issue 14), around the released configuration: every key the paper
    # or the released code exposes as a knob of the method, ablation-only settings (gate off, one
    # band, no item graph) left out. A list is a finite set, a mapping a range (search.py).
    search_space = {
        "lr": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
        "ib_weight": {"type": "float", "low": 1e-3, "high": 10.0, "log": True},
        "cl_weight": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True},
        "num_bands": [2, 3, 4, 6],
        "gate": ["pos", "dual"],
        "train_features": [True, False],
        "knn_k": [5, 10, 20, 40],
        "modality_weights": {"type": "weights"},
    }
    choices = {
        "gate": ("pos", "dual", "off"),
        "ib_mode": ("pos", "dual"),
        "loss": ("bce", "bpr"),
        "consistency": ("cross_band", "cross_modal", "none"),
        "feature_precision": ("float32", "bfloat16"),
    }

    @classmethod
    def check(cls, dataset, config):
        super().check(dataset, config)
        d = config["embedding_size"]
        if not 1 <= config["num_bands"] <= d:
            raise InputError(f"config key 'num_bands': must be between 1 and embedding_size ({d}), got {config['num_bands']}")
        if (config["item_graph"] or config["user_graph"]) and not dataset.features:
            raise InputError(
                f"{dataset.source}: fitmm's item/user kNN graphs need content features, and this dataset has none; "
                f"add *_feat.npy files or run ID-only with --set item_graph=false"
            )
        # Each k only matters when its graph is built: a 5-user dataset must not fail on user_knn_k
        # when the user graph is off.
        for key, count, what, used in (("knn_k", dataset.n_items, "items", config["item_graph"]),
                                       ("user_knn_k", dataset.n_users, "users", config["user_graph"])):
            if used and config[key] > count:
                raise InputError(f"config key '{key}': must be at most the number of {what} ({count}), got {config[key]}")
        cls.check_modality_weights(dataset, config)

    def __init__(self, dataset, config):
        super().__init__(dataset, config)
        d = self.d = config["embedding_size"]
        self.modalities = dataset.modalities
        n_branches = 1 + len(self.modalities)
        self.num_bands = config["num_bands"]

        # §3: per branch, a user ego table; items: an ID table, or an MLP over raw features.
        self.user_ego = nn.ParameterList(
            nn.Parameter(nn.init.xavier_normal_(torch.empty(self.n_users, d))) for _ in range(n_branches)
        )
        self.item_id = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_items, d)))
        self.features = nn.ParameterList()
        self.mlps = nn.ModuleList()
        for name in self.modalities:
            feat = torch.from_numpy(dataset.features_for_model(name, trained=config["train_features"]))
            self.features.append(nn.Parameter(feat, requires_grad=config["train_features"]))
            # In place: the activation then keeps only its output (which the second layer saves
            # anyway) for its backward, not its input too; one I x mlp_hidden matrix less held.
            self.mlps.append(nn.Sequential(
                nn.Linear(feat.shape[1], config["mlp_hidden"]), nn.LeakyReLU(0.01, inplace=True),
                nn.Linear(config["mlp_hidden"], d),
            ))
        # §4: per-user modality weights, softmax of a xavier-normal draw, then trained freely.
        self.user_modality_weights = nn.Parameter(
            torch.softmax(nn.init.xavier_normal_(torch.empty(self.n_users, n_branches)), dim=1)
        )
        # §7: separate gates and band weights for users and items.
        dim = d * n_branches
        self.user_gate = spectral.ResidualGate(dim, self.num_bands, config["gate"], config["gate_scale_init"])
        self.item_gate = spectral.ResidualGate(dim, self.num_bands, config["gate"], config["gate_scale_init"])
        self.user_band_weights = spectral.BandWeights(self.num_bands)
        self.item_band_weights = spectral.BandWeights(self.num_bands)

        # Fixed graphs (not parameters, not saved: rebuilt from the data).
        self.adjacency = to_torch(normalized_adjacency(dataset.train))
        self.item_graph = self.item_graph_t = self.user_graph = self.user_graph_t = None
        if dataset.features:
            weights = config["modality_weights"] or default_modality_weights(self.modalities)
        if config["item_graph"]:
            s = cached_mixed_knn_graph(dataset.features, config["knn_k"], weights, dataset.fingerprint, cache_dir(config))
            self.item_graph, self.item_graph_t = to_torch(s), to_torch(s.T.tocsr())
        if config["user_graph"]:
            s = user_knn_graph(dataset.train, dataset.features, config["user_knn_k"], weights)
            self.user_graph, self.user_graph_t = to_torch(s), to_torch(s.T.tocsr())

    # -- 1-2: branches and views --------------------------------------------------------------

    def _item_ego(self, mlp, feat):
        """An MLP over ALL items' raw features: with 4096-d image features it is most of a step's
        FLOPs (forward, weight gradient and, with trainable features, feature gradient: three
        I x 4096 x 256 products). bfloat16 runs those products ~2.8x faster on CPUs with
        AVX512-BF16/AMX (and on GPUs); parameters, Adam state and everything after the MLP
        stay float32."""
        if self.config["feature_precision"] == "bfloat16":
            with torch.autocast(device_type=feat.device.type, dtype=torch.bfloat16):
                return mlp(feat).float()
        return mlp(feat)

    def _views(self):
        """Base and enhanced views (X_U, H_U, X_I, H_I); H_I is None without the item graph."""
        item_ego = [self.item_id] + [self._item_ego(mlp, feat) for mlp, feat in zip(self.mlps, self.features)]
        branches = []
        for user_ego, items in zip(self.user_ego, item_ego):
            # Rows normalised before the concatenation (the same values): normalize's backward
            # then holds the user table itself, not an (I + U) x d copy of it.
            x = torch.cat([F.normalize(user_ego, dim=1), F.normalize(items, dim=1)])
            total = x
            for _ in range(self.config["n_layers"]):
                x = sparse_matmul(self.adjacency, x)
                total = total + x  # layer SUM, as released (not LightGCN's mean)
            branches.append(total)
        w = self.user_modality_weights
        x_u = torch.cat([w[:, m:m + 1] * b[: self.n_users] for m, b in enumerate(branches)], dim=1)
        x_i = torch.cat([b[self.n_users:] for b in branches], dim=1)
        h_i = None
        if self.item_graph is not None:
            h_i = x_i
            for _ in range(self.config["n_mm_layers"]):
                h_i = sparse_matmul(self.item_graph, h_i, self.item_graph_t)
        h_u = torch.cat(list(self.user_ego), dim=1)
        if self.user_graph is not None:
            h_u = sparse_matmul(self.user_graph, h_u, self.user_graph_t)
        return x_u, h_u, x_i, h_i

    # -- 3-4: bands, gates, fusion ------------------------------------------------------------

    def _side(self, base, enhanced, gate, band_weights, rows=None):
        """Fused embeddings of `rows` (all when None), their bands, and the gates of ALL nodes.

        Band projectors always come from the full matrices (the spectrum is a property of the
        whole table); only the requested rows are projected.
        """
        pick = (lambda t: t) if rows is None else (lambda t: t.index_select(0, rows))  # backward: index_add
        bands = _apply_projectors(pick(base), _band_projectors(base, self.d, self.num_bands))
        if enhanced is not None:
            bands = bands + _apply_projectors(pick(enhanced), _band_projectors(enhanced, self.d, self.num_bands))
        gates = gate(base)
        return spectral.fuse(bands, pick(gates), band_weights()), bands, gates

    def embed(self):
        x_u, h_u, x_i, h_i = self._views()
        users, _, _ = self._side(x_u, h_u, self.user_gate, self.user_band_weights)
        items, _, _ = self._side(x_i, h_i, self.item_gate, self.item_band_weights)
        return users, items

    # -- 5: losses ----------------------------------------------------------------------------

    def loss(self, batch):
        cfg = self.config
        x_u, h_u, x_i, h_i = self._views()
        # A batch repeats users and items: compute each once, weight by its count where it matters
        # (the consistency terms), and expand back for the per-pair recommendation loss.
        n = len(batch.users)
        users_u, user_at, user_counts = torch.unique(batch.users, return_inverse=True, return_counts=True)
        items_u, item_at = torch.unique(torch.cat([batch.pos_items, batch.neg_items]), return_inverse=True)
        users, user_bands, user_gates = self._side(x_u, h_u, self.user_gate, self.user_band_weights, users_u)
        items, item_bands, item_gates = self._side(x_i, h_i, self.item_gate, self.item_band_weights, items_u)
        u = users[user_at]
        pos = (u * items[item_at[:n]]).sum(1)
        neg = (u * items[item_at[n:]]).sum(1)
        if cfg["loss"] == "bce":
            logits = torch.cat([pos, neg])
            rec = F.binary_cross_entropy_with_logits(logits, torch.cat([torch.ones_like(pos), torch.zeros_like(neg)]))
        else:
            rec = bpr_loss(pos, neg)
        total = rec
        parts = {"rec": rec.item()}
        if cfg["ib_weight"] and cfg["gate"] != "off":
            ib = sum(
                spectral.ib_loss(g, cfg["ib_alpha"], cfg["ib_mu"], cfg["ib_phi"], cfg["ib_mode"])
                for g in (user_gates, item_gates)
            )
            total = total + cfg["ib_weight"] * ib
            parts["ib"] = ib.item()
        if cfg["cl_weight"] and cfg["consistency"] != "none":
            # Consistency runs over the batch's users and POSITIVE items (as released).
            pos_u, pos_counts = torch.unique(batch.pos_items, return_counts=True)
            pos_bands = item_bands[:, torch.searchsorted(items_u, pos_u)]
            if cfg["consistency"] == "cross_band":
                cl = spectral.cross_band_consistency(user_bands, cfg["cl_tau"], user_counts) + \
                    spectral.cross_band_consistency(pos_bands, cfg["cl_tau"], pos_counts)
            else:
                cl = spectral.cross_modal_consistency(user_bands, self.d, cfg["cl_tau"], user_counts) + \
                    spectral.cross_modal_consistency(pos_bands, self.d, cfg["cl_tau"], pos_counts)
            total = total + cfg["cl_weight"] * cl
            parts["cl"] = cl.item()
        return total, parts

    # -- diagnostics: what a trained FITMM learned about its bands (used by the HTML report) ----

    @torch.no_grad()
    def diagnostics(self) -> dict:
        """The spectral state of the model, as numpy arrays (side = "user" or "item"):

        - "modalities": the branch names, one 64-column chunk each ("id", then each modality);
        - "band_energy"[side]: (chunks x M), the share of each chunk's squared singular values
          (of the base view X_U / X_I, whose singular basis defines the bands) in each band;
          band 1 holds the largest singular values; each row sums to 1;
        - "gates"[side]: (nodes x M), every user's / item's gate value per band;
        - "band_weights"[side]: (M,), the learned global band weights w_b = sigmoid(phi_b).
        """
        x_u, _, x_i, _ = self._views()
        sizes = spectral.band_sizes(self.d, self.num_bands)
        out = {"modalities": ["id", *self.modalities], "band_energy": {}, "gates": {}, "band_weights": {}}
        for side, x, gate, weights in (("user", x_u, self.user_gate, self.user_band_weights),
                                       ("item", x_i, self.item_gate, self.item_band_weights)):
            chunks = x.double().reshape(x.shape[0], -1, self.d).transpose(0, 1)  # (C, n, d)
            energy = torch.linalg.eigvalsh(chunks.transpose(1, 2) @ chunks).flip(-1).clamp_min(0)  # sigma^2, descending
            per_band = torch.stack([part.sum(-1) for part in energy.split(sizes, dim=-1)], dim=-1)
            out["band_energy"][side] = (per_band / per_band.sum(-1, keepdim=True).clamp_min(1e-300)).numpy()
            out["gates"][side] = gate(x).cpu().numpy()
            out["band_weights"][side] = weights().cpu().numpy()
        return out

    # -- serving: explanations and cold-start items (used by fitmm.api, never by training) -----

    def _band_terms(self, base, enhanced, gate, band_weights, new_base=None, new_enhanced=None):
        """Band terms (n x M x D) of the fused embeddings: term b of a row is w_b g_b Z_b, so the
        terms sum over b to `_side`'s e. The projectors always come from the full `base` and
        `enhanced` matrices; given `new_base` (and `new_enhanced`), the terms of those extra rows
        are returned instead (new items are projected onto the catalogue's own bands)."""
        rows = base if new_base is None else new_base
        bands = _apply_projectors(rows, _band_projectors(base, self.d, self.num_bands))
        if enhanced is not None:
            rows_enhanced = enhanced if new_base is None else new_enhanced
            bands = bands + _apply_projectors(rows_enhanced, _band_projectors(enhanced, self.d, self.num_bands))
        return torch.einsum("bnd,nb,b->nbd", bands, gate(rows), band_weights())

    @torch.no_grad()
    def explain_parts(self):
        """Band terms of every user and item, (n x M x D) each: summed over the bands, embed()."""
        x_u, h_u, x_i, h_i = self._views()
        users = self._band_terms(x_u, h_u, self.user_gate, self.user_band_weights)
        items = self._band_terms(x_i, h_i, self.item_gate, self.item_band_weights)
        return users, items

    def explain(self, user_part, item_part):
        """Score of one user's and one item's band terms (M x D each), split two exact ways.

        - `band_table[b][c]` = (user band b) . (item band c). The user and item bands live in
          different singular bases, so off-diagonal cells are not zero; the table sums to the score.
        - `bands[b]` = half of row b's sum plus half of column b's sum: band b's share when the
          user's band b meets the whole item vector and the item's band b meets the whole user
          vector, split evenly. The bands sum to the score.
        - `modalities[m]` = (user's 64-column chunk m) . (item's chunk m), m = id and each content
          modality. They sum to the score.
        All in float64 from the float32 terms, so each group sums to `score` to ~1e-12 relative;
        `score` itself matches the float32 scores of recommend/score to float32 rounding.
        """
        u, i = user_part.double(), item_part.double()
        table = u @ i.T
        eu, ei = u.sum(0), i.sum(0)
        per_modality = (eu * ei).reshape(-1, self.d).sum(1)
        names = ["id", *self.modalities]
        return {
            "score": float(eu @ ei),
            "bands": {f"band{b + 1}": float(0.5 * (table[b].sum() + table[:, b].sum())) for b in range(self.num_bands)},
            "modalities": {name: float(c) for name, c in zip(names, per_modality)},
            "band_table": table.tolist(),
        }

    def _catalogue_links(self, dataset, new_features):
        """The new items' rows of the item kNN graph (n_new x n_items, dense): per modality, the
        knn_k - 1 most cosine-similar catalogue items (raw features, as the graph was built) each
        weighted w_m / knn_k; the remaining 1 / knn_k of every row is the item itself."""
        k = self.config["knn_k"]
        weights = self.config["modality_weights"] or default_modality_weights(self.modalities)
        n_new = next(iter(new_features.values())).shape[0]
        links = torch.zeros(n_new, self.n_items)
        if k == 1:
            return links
        for name in self.modalities:
            catalogue = F.normalize(torch.from_numpy(dataset.features_for_model(name)), dim=1)
            new = F.normalize(new_features[name].cpu(), dim=1)
            nearest = (new @ catalogue.T).topk(min(k - 1, self.n_items), dim=1).indices
            links.scatter_add_(1, nearest, torch.full(nearest.shape, weights[name] / k))
        return links

    @torch.no_grad()
    def cold_items(self, dataset, features):
        """Embeddings and band terms of new items from their raw content alone.

        Such an item has no interactions, so its branches are the layer-0 rows only (the graph
        layers never reach it): a zero ID chunk (it has no trained ID row) and, per modality, the
        normalised MLP output of its features. Its enhanced view is its row of the item kNN
        graph to the existing catalogue (`_catalogue_links`), so it borrows its neighbours'
        collaborative (ID) signal. Bands use the catalogue's projectors; the gate and band
        weights are the trained ones. The catalogue's own embeddings are left unchanged (new
        items do not become anyone's neighbours)."""
        x_u, h_u, x_i, h_i = self._views()
        device = x_i.device
        new = {name: torch.as_tensor(features[name], dtype=torch.float32, device=device) for name in self.modalities}
        n_new = new[self.modalities[0]].shape[0]
        chunks = [x_i.new_zeros(n_new, self.d)]
        chunks += [F.normalize(self._item_ego(mlp, new[name]), dim=1) for name, mlp in zip(self.modalities, self.mlps)]
        new_x = torch.cat(chunks, dim=1)
        new_h = None
        if h_i is not None:
            links = self._catalogue_links(dataset, new).to(device)
            catalogue = x_i
            new_h = new_x
            for _ in range(self.config["n_mm_layers"]):
                new_h = new_h / self.config["knn_k"] + links @ catalogue
                catalogue = sparse_matmul(self.item_graph, catalogue, self.item_graph_t)
        terms = self._band_terms(x_i, h_i, self.item_gate, self.item_band_weights, new_x, new_h)
        return terms.sum(1), terms

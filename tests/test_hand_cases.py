"""Hand-checkable forward values of every model on tests/tiny.py's 3-user, 4-item problem.

Every expected value is derived here independently of the code under test: in the comments by
hand (closed forms), or by a few explicit numpy lines that follow the documented formula (the
model's docstring; for FITMM the method spec, ../shared/docs/fitmm-method.md). Parameters are
set by hand where the derivation needs simple numbers; only FITMM's reference reads the model's
own (random) initial parameters, as plain numbers fed to an independent numpy implementation.

The normalised adjacency of the tiny graph (users u0..u2, then items i0..i3; degrees
u0 2, u1 1, u2 1, i0 1, i1 2, i2 1, i3 0), entry 1 / sqrt(deg_u deg_i) per edge:

    u0-i0  1/sqrt(2*1) = 1/sqrt2      u0-i1  1/sqrt(2*2) = 1/2
    u1-i1  1/sqrt(1*2) = 1/sqrt2      u2-i2  1/sqrt(1*1) = 1         i3: a zero row and column
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from fitmm.graphs import normalized_adjacency
from fitmm.models.base import bpr_loss, l2_penalty
from tiny import N_USERS, R, S_IMAGE, batch, build, tiny_dataset

R2 = 1 / math.sqrt(2)
SQ2 = math.sqrt(2)

A_HAT = np.zeros((7, 7))
for (u, i), value in {(0, 0): R2, (0, 1): 0.5, (1, 1): R2, (2, 2): 1.0}.items():
    A_HAT[u, N_USERS + i] = A_HAT[N_USERS + i, u] = value
UI = A_HAT[:N_USERS, N_USERS:]  # the normalised user-item block


def setp(param, value):
    with torch.no_grad():
        param.copy_(torch.as_tensor(np.asarray(value, dtype=np.float32)))


def close(actual, expected, tol=1e-5):
    np.testing.assert_allclose(np.asarray(actual.detach() if torch.is_tensor(actual) else actual, dtype=float),
                               np.asarray(expected, dtype=float), rtol=tol, atol=tol)


def normalize_rows(x):
    """Unit rows; a zero row (the isolated item after a graph layer) stays zero."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def softplus(x):
    return np.log1p(np.exp(x))


# -- the pieces every model shares --------------------------------------------------------------


def test_normalized_adjacency_by_hand():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the isolated item's degree 0 must not be raised to -1/2
        a = normalized_adjacency(tiny_dataset().train).toarray()
    close(a, A_HAT, 1e-7)
    assert not a[N_USERS + 3].any() and not a[:, N_USERS + 3].any()  # the isolated item


def test_bpr_loss_by_hand():
    # mean(softplus(neg - pos)) = (log(1 + e^-1) + log 2) / 2
    close(bpr_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])), (math.log1p(math.exp(-1)) + math.log(2)) / 2)


def test_l2_penalty_by_hand():
    # (1 + 4 + 0 + 1) + (9 + 0 + 0 + 0) = 15 summed squares, / (2 * batch of 2) = 3.75
    close(l2_penalty(torch.tensor([[1.0, 2.0], [0.0, 1.0]]), torch.tensor([[3.0, 0.0], [0.0, 0.0]])), 3.75)


# -- LightGCN, BPR, most-popular ----------------------------------------------------------------

# d = 1, ego values users (1, 0, 2), items (2, 4, 1, 5). Two layers of E <- A_HAT E:
#   E1: u0 = 2/sqrt2 + 4/2 = sqrt2 + 2, u1 = 4/sqrt2 = 2 sqrt2, u2 = 1;
#       i0 = 1/sqrt2, i1 = 1/2 + 0 = 1/2, i2 = 2, i3 = 0
#   E2: u0 = (1/sqrt2)/sqrt2 + (1/2)/2 = 3/4, u1 = (1/2)/sqrt2 = sqrt2/4, u2 = 2;
#       i0 = (sqrt2 + 2)/sqrt2 = 1 + sqrt2, i1 = (sqrt2 + 2)/2 + 2 sqrt2/sqrt2 = 3 + sqrt2/2, i2 = 1, i3 = 0
# LightGCN's readout is the MEAN of E0, E1, E2:
EGO_USERS, EGO_ITEMS = [1.0, 0.0, 2.0], [2.0, 4.0, 1.0, 5.0]
LGCN_USERS = [(3.75 + SQ2) / 3, 3 * SQ2 / 4, 5 / 3]
LGCN_ITEMS = [1 + SQ2 / 2, (7.5 + SQ2 / 2) / 3, 4 / 3, 5 / 3]
# With one layer, the mean of E0 and E1:
LGCN1_USERS = [(3 + SQ2) / 2, SQ2, 1.5]
LGCN1_ITEMS = [(2 + R2) / 2, 2.25, 1.5, 2.5]


def test_lightgcn_embeddings_and_scores_by_hand():
    model = build("lightgcn", embedding_size=1, n_layers=2)
    setp(model.user_emb, np.array(EGO_USERS)[:, None])
    setp(model.item_emb, np.array(EGO_ITEMS)[:, None])
    users, items = model.embed()
    close(users[:, 0], LGCN_USERS)
    close(items[:, 0], LGCN_ITEMS)
    close(model.score(users, items), np.outer(LGCN_USERS, LGCN_ITEMS))


def test_lightgcn_loss_by_hand():
    model = build("lightgcn", embedding_size=1, n_layers=2, reg_weight=0.5)
    setp(model.user_emb, np.array(EGO_USERS)[:, None])
    setp(model.item_emb, np.array(EGO_ITEMS)[:, None])
    loss, parts = model.loss(batch([0, 2], [1, 2], [3, 0]))
    u, i = LGCN_USERS, LGCN_ITEMS
    rec = (softplus(u[0] * i[3] - u[0] * i[1]) + softplus(u[2] * i[0] - u[2] * i[2])) / 2
    # EmbLoss on the EGO rows of the batch: norms (not squared) of users (1, 2), positives (4, 1),
    # negatives (5, 2): sqrt5 + sqrt17 + sqrt29, over the batch of 2
    reg = 0.5 * (math.sqrt(5) + math.sqrt(17) + math.sqrt(29)) / 2
    close(parts["bpr"], rec)
    close(parts["reg"], reg)
    close(loss, rec + reg)


# d = 2: users u0 (1, 0), u1 (0, 1), u2 (1, 1); items i0 (1, 1), i1 (2, 0), i2 (0, -1), i3 (1, 2).
BPR_USERS = [[1, 0], [0, 1], [1, 1]]
BPR_ITEMS = [[1, 1], [2, 0], [0, -1], [1, 2]]


def test_bpr_scores_and_loss_by_hand():
    model = build("bpr", embedding_size=2, reg_weight=0.5)
    setp(model.user_emb, BPR_USERS)
    setp(model.item_emb, BPR_ITEMS)
    # scores u.i: u0 (1, 2, 0, 1), u1 (1, 0, -1, 2), u2 (2, 2, -1, 3)
    close(model.score(*model.embed()), [[1, 2, 0, 1], [1, 0, -1, 2], [2, 2, -1, 3]])
    loss, parts = model.loss(batch([0, 1], [1, 1], [3, 0]))
    # pairs (u0: pos 2, neg 1) and (u1: pos 0, neg 1): mean(softplus(-1), softplus(1));
    # EmbLoss: Frobenius norms (not squared) of the batch's tables, over the batch of 2:
    #   users u0, u1: sqrt(1 + 1); positives i1, i1: sqrt(4 + 4); negatives i3, i0: sqrt(5 + 2); times 0.5
    rec = (softplus(-1) + softplus(1)) / 2
    reg = 0.5 * (math.sqrt(2) + math.sqrt(8) + math.sqrt(7)) / 2
    close(parts["bpr"], rec)
    close(parts["reg"], reg)
    close(loss, rec + reg)


def test_most_popular_scores_are_training_counts():
    model = build("pop")
    # training interactions per item: i0 1, i1 2, i2 1, i3 0 -- the same row for every user
    close(model.score(*model.embed()), [[1, 2, 1, 0]] * 3)


# -- VBPR ---------------------------------------------------------------------------------------


def test_vbpr_scores_by_hand():
    model = build("vbpr", embedding_size=1)  # 1 ID factor + 1 content factor per item; users 2 wide
    # f_i = [image | text] (5-d); E = [1, 0, 0, 0, 1] picks image[0] + text[2], bias b = 0.5:
    #   E f + b = i0 1 + 0 + .5 = 1.5, i1 1 + 0 + .5 = 1.5, i2 1 + 1 + .5 = 2.5, i3 0 + 1 + .5 = 1.5
    setp(model.projection.weight, [[1, 0, 0, 0, 1]])
    setp(model.projection.bias, [0.5])
    setp(model.user_id, [[1], [2], [0]])  # gamma_u
    setp(model.item_id, [[0], [1], [2], [3]])  # gamma_i
    setp(model.user_content, [[1], [0], [3]])  # theta_u
    # x_ui = gamma_u gamma_i + theta_u (E f_i + b):
    #   u0: (0+1.5, 1+1.5, 2+2.5, 3+1.5) = (1.5, 2.5, 4.5, 4.5); u1: (0, 2, 4, 6); u2: 3 * (1.5, 1.5, 2.5, 1.5)
    expected = [[1.5, 2.5, 4.5, 4.5], [0, 2, 4, 6], [4.5, 4.5, 7.5, 4.5]]
    close(model.score(*model.embed()), expected)
    id_part, content_part = model.score_parts(torch.arange(3), torch.arange(4))
    close(id_part, np.outer([1, 2, 0], [0, 1, 2, 3]))
    close(id_part + content_part, expected)


# -- FREEDOM ------------------------------------------------------------------------------------


def test_freedom_embeddings_by_hand():
    # One modality (image), so the item graph is S_image itself (weight 1): rows
    # i0 {0, 1}, i1 {0, 1}, i2 {1, 2}, i3 {2, 3}, 1/2 each -- not symmetric.
    model = build("freedom", dataset=tiny_dataset(["image"]), embedding_size=1, knn_k=2, n_ui_layers=1, n_mm_layers=1)
    close(model.item_graph.to_dense(), S_IMAGE)
    setp(model.user_emb, np.array(EGO_USERS)[:, None])
    setp(model.item_emb, np.array(EGO_ITEMS)[:, None])
    users, items = model.embed()
    # Users: LightGCN, one layer (mean of E0, E1). Items: that plus S e_i with e = (2, 4, 1, 5):
    #   i0 (2+4)/2 = 3, i1 (2+4)/2 = 3, i2 (4+1)/2 = 2.5, i3 (1+5)/2 = 3   (S^T e would give 3, 3.5, 3, 2.5)
    close(users[:, 0], LGCN1_USERS)
    close(items[:, 0], np.array(LGCN1_ITEMS) + [3, 3, 2.5, 3])


# -- SMORE --------------------------------------------------------------------------------------


def test_smore_embeddings_by_hand():
    model = build("smore", dataset=tiny_dataset(["image"]), embedding_size=2, n_ui_layers=1, n_mm_layers=1,
                  image_knn_k=2, dropout=0.0)
    model.eval()
    eye, zero = np.eye(2), np.zeros((2, 2))
    setp(model.projections[0].weight, eye)
    setp(model.projections[0].bias, [0, 0])
    # Length-2 orthonormal rfft: X0 = (x0 + x1)/sqrt2, X1 = (x0 - x1)/sqrt2. A real response (a, b)
    # gives back ((a+b) x0 + (a-b) x1, (a-b) x0 + (a+b) x1) / 2.
    setp(model.filters[0], [[1, 0], [0.5, 0]])  # (1, .5): x M with M = [[.75, .25], [.25, .75]]
    setp(model.fusion_filter, [[1, 0], [1, 0]])  # all-pass on the RAW spectrum: the fused output is x
    for gate in model.view_gates:  # sigmoid(spectral output): the ID rows are gated element-wise
        setp(gate[0].weight, eye)
        setp(gate[0].bias, [0, 0])
    setp(model.queries[0][0].weight, eye)  # query = tanh(fused view) (then an identity, bias-free)
    setp(model.queries[0][0].bias, [0, 0])
    setp(model.queries[0][2].weight, eye)
    setp(model.prefer_gates[0][0].weight, eye)  # image preference = sigmoid(behaviour view)
    setp(model.prefer_gates[0][0].bias, [0, 0])
    setp(model.prefer_gates[1][0].weight, zero)  # fused preference = sigmoid(0) = 1/2
    setp(model.prefer_gates[1][0].bias, [0, 0])
    ego_u = np.array([[1, 1], [0, 1], [2, 0]], dtype=float)
    ego_i = np.array([[2, 0], [4, 1], [1, 1], [5, 0]], dtype=float)
    setp(model.user_emb, ego_u)
    setp(model.item_emb, ego_i)
    users, items = model.embed()

    sigmoid = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    # The modality graph: top-2 cosine neighbours (the sets of S_image), each edge weighted by its
    # cosine, then a_ij / sqrt(d_i d_j) with d the weighted row sums.
    x = np.array([[1, 0], [1, 0.2], [1, 0.5], [0, 1]])
    cos = (x @ x.T) / np.outer(np.linalg.norm(x, axis=1), np.linalg.norm(x, axis=1))
    a = np.where(S_IMAGE > 0, cos, 0.0)
    d = a.sum(1)
    graph = a / np.sqrt(np.outer(d, d))  # one modality: the fused graph (their max) is the same
    mix = np.array([[0.75, 0.25], [0.25, 0.75]])
    h_image = graph @ (ego_i * sigmoid(x @ mix))  # one item-graph layer
    h_fused = graph @ (ego_i * sigmoid(x))
    v_image, v_fused = np.vstack([UI @ h_image, h_image]), np.vstack([UI @ h_fused, h_fused])
    ego = np.vstack([ego_u, ego_i])
    behaviour = (ego + A_HAT @ ego) / 2
    q = np.exp(np.tanh(v_fused))
    attention = q / q.sum(1, keepdims=True)  # softmax over the 2 dimensions
    side = (sigmoid(behaviour) * attention * v_image + 0.5 * v_fused) / 2  # the mean of the 2 views
    expected = behaviour + side
    close(users, expected[:N_USERS])
    close(items, expected[N_USERS:])


# -- LGMRec -------------------------------------------------------------------------------------


def test_lgmrec_embeddings_by_hand():
    model = build("lgmrec", dataset=tiny_dataset(["image"]), embedding_size=2, n_ui_layers=1, n_mm_layers=1,
                  hyper_num=2, n_hyper_layers=1, alpha=0.5, gumbel=False)
    model.eval()  # plain softmax over hyperedges (the Gumbel noise is off), no dropout
    setp(model.projections[0].weight, [[1, 0], [1, 1]])  # bias-free, as the reference
    setp(model.hyperedges[0], [[2, 0], [0, 1]])
    ego_u = np.array([[1, 1], [0, 1], [2, 0]], dtype=float)
    ego_i = np.array([[2, 0], [4, 1], [1, 1], [5, 0]], dtype=float)
    setp(model.user_emb, ego_u)
    setp(model.item_emb, ego_i)
    users, items = model.embed()

    x = np.array([[1, 0], [1, 0.2], [1, 0.5], [0, 1]])
    ego = np.vstack([ego_u, ego_i])
    collaborative = (ego + A_HAT @ ego) / 2  # LightGCN, 1 layer, mean readout
    proj = x @ np.array([[1, 0], [1, 1]]).T
    user_start = (R / R.sum(1, keepdims=True)) @ proj  # mean of each user's training items
    modal = A_HAT @ np.vstack([user_start, proj])  # 1 layer, last layer kept
    local = collaborative + normalize_rows(modal)
    logits = x @ np.array([[2, 0], [0, 1]]).T
    softmax = lambda z: np.exp(z) / np.exp(z).sum(1, keepdims=True)  # noqa: E731
    h_items = softmax(logits)
    h_users = softmax(R @ logits)  # a user's logits: the SUM of its items' logits (binary R)
    edges = h_items.T @ collaborative[N_USERS:]
    g_users, g_items = h_users @ edges, h_items @ edges
    close(users, local[:N_USERS] + 0.5 * normalize_rows(g_users))
    close(items, local[N_USERS:] + 0.5 * normalize_rows(g_items))


# -- BM3 ----------------------------------------------------------------------------------------


def test_bm3_embeddings_are_the_predictor_over_lightgcn():
    model = build("bm3", embedding_size=1, n_layers=2)
    setp(model.user_emb, np.array(EGO_USERS)[:, None])
    setp(model.item_emb, np.array(EGO_ITEMS)[:, None])
    setp(model.predictor.weight, [[2.0]])
    setp(model.predictor.bias, [1.0])
    users, items = model.embed()
    # the online view f_p(h) = 2 h + 1 of the 2-layer LightGCN values above; items add their own
    # ID embedding to the readout (the reference's residual)
    close(users[:, 0], 2 * np.array(LGCN_USERS) + 1)
    close(items[:, 0], 2 * (np.array(LGCN_ITEMS) + EGO_ITEMS) + 1)


def test_bm3_loss_by_hand_without_dropout():
    model = build("bm3", embedding_size=2, n_layers=0, dropout=0.0, reg_weight=0.5, cl_weight=2.0,
                  dataset=tiny_dataset(["image"]))
    setp(model.user_emb, [[1, 0], [0, 1], [1, 1]])
    setp(model.item_emb, [[1, 1], [2, 0], [0, 1], [1, 2]])
    setp(model.predictor.weight, [[0, 1], [1, 0]])  # swaps the two coordinates
    setp(model.predictor.bias, [0, 0])
    setp(model.projections[0].weight, np.eye(2))
    setp(model.projections[0].bias, [0, 0])
    loss, parts = model.loss(batch([0, 2], [1, 2]))
    # n_layers 0: h_u = ego users; h_i = readout (ego) + ID residual = 2 ego items:
    #   i0 (2,2), i1 (4,0), i2 (0,2), i3 (2,4). Pairs (u0 (1,0), i1 (4,0)) and (u2 (1,1), i2 (0,2));
    # online = swapped coordinates. C(a, b) = 1 - mean cos:
    #   rec = C(on_u, h_i) + C(on_i, h_u): cos((0,1),(4,0)) = 0, cos((1,1),(0,2)) = 1/sqrt2;
    #   cos((0,4),(1,0)) = 0, cos((2,0),(1,1)) = 1/sqrt2  ->  2 (1 - 1/(2 sqrt2))
    close(parts["rec"], 2 * (1 - R2 / 2))
    # modality: h_m = image features of i1 (1, .2) and i2 (1, .5); online = swapped (.2, 1), (.5, 1)
    #   align = C(on_m, h_i) (cosine ignores the residual's factor 2); mask = C(on_m, h_m)
    cos = lambda a, b: np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b)  # noqa: E731
    align = 1 - (cos([0.2, 1], [2, 0]) + cos([0.5, 1], [0, 1])) / 2
    mask = 1 - (cos([0.2, 1], [1, 0.2]) + cos([0.5, 1], [1, 0.5])) / 2
    close(parts["align"], align)
    close(parts["mask"], mask)
    # reg: Frobenius norms (not squared) of the WHOLE encoder tables over n_items = 4:
    #   users 1 + 1 + 2 = 4 -> 2; items 8 + 16 + 4 + 20 = 48 -> 4 sqrt3; times 0.5
    reg = 0.5 * (2 + 4 * math.sqrt(3)) / 4
    close(parts["reg"], reg)
    close(loss, 2 * (1 - R2 / 2) + 2 * (align + mask) + reg)


# -- FITMM --------------------------------------------------------------------------------------
# An independent numpy implementation of the method spec (fitmm-method.md §3-§8), for d = 2, M = 2 bands (one
# singular direction each), ID + one content modality (image), item kNN graph S_image, two
# user-item layers (layer SUM), one item-graph layer, the MLP set to the identity.

FITMM_TINY = dict(embedding_size=2, num_bands=2, mlp_hidden=2, knn_k=2, user_knn_k=2, n_layers=2, n_mm_layers=1,
                  cl_weight=0.5, cl_tau=0.7, ib_weight=0.8, ib_alpha=1.3, ib_mu=0.6, ib_phi=0.05)


def _fitmm(**overrides):
    model = build("fitmm", dataset=tiny_dataset(["image"]), seed=1, **{**FITMM_TINY, **overrides})
    mlp = model.mlps[0]
    for layer in (mlp[0], mlp[2]):
        setp(layer.weight, np.eye(2))
        setp(layer.bias, [0, 0])
    return model


def _np(t):
    return t.detach().double().numpy()


def _bands(y, d=2):
    """Per d-column chunk: band b = Y v_b v_b^T, v_b the b-th right singular vector (descending)."""
    out = np.zeros((2, *y.shape))
    for c in range(y.shape[1] // d):
        block = y[:, c * d:(c + 1) * d]
        _, _, vt = np.linalg.svd(block)
        for b in range(2):
            out[b, :, c * d:(c + 1) * d] = block @ np.outer(vt[b], vt[b])
    return out


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def fitmm_reference(model, users, pos, neg):
    cfg = model.config
    p = {name: _np(value) for name, value in model.named_parameters()}
    item_egos = [p["item_id"], np.where(p["features.0"] > 0, p["features.0"], 0.01 * p["features.0"])]  # identity MLP
    branches = []
    for m, item_ego in enumerate(item_egos):
        x = normalize_rows(np.vstack([p[f"user_ego.{m}"], item_ego]))
        branches.append(x + A_HAT @ x + A_HAT @ A_HAT @ x)  # layer sum, 2 layers
    w = p["user_modality_weights"]
    x_u = np.hstack([w[:, m:m + 1] * b[:N_USERS] for m, b in enumerate(branches)])
    x_i = np.hstack([b[N_USERS:] for b in branches])
    h_i = S_IMAGE @ x_i
    h_u = np.hstack([p["user_ego.0"], p["user_ego.1"]])
    z_u, z_i = _bands(x_u) + _bands(h_u), _bands(x_i) + _bands(h_i)
    act = _sigmoid if cfg["gate"] == "pos" else np.tanh  # §7: 'dual' gates may shrink a band
    g_u = 1 + p["user_gate.scale"] * act(x_u @ p["user_gate.proj.weight"].T + p["user_gate.proj.bias"])
    g_i = 1 + p["item_gate.scale"] * act(x_i @ p["item_gate.proj.weight"].T + p["item_gate.proj.bias"])
    e_u = np.einsum("bnd,nb,b->nd", z_u, g_u, _sigmoid(p["user_band_weights.phi"]))
    e_i = np.einsum("bnd,nb,b->nd", z_i, g_i, _sigmoid(p["item_band_weights.phi"]))

    users, pos, neg = (np.asarray(v) for v in (users, pos, neg))
    pos_s, neg_s = (e_u[users] * e_i[pos]).sum(1), (e_u[users] * e_i[neg]).sum(1)
    if cfg["loss"] == "bce":  # positives 1, negatives 0
        rec = np.mean(np.concatenate([softplus(-pos_s), softplus(neg_s)]))
    else:
        rec = np.mean(softplus(neg_s - pos_s))

    def ib(g):  # over ALL nodes of a side
        delta = np.maximum(g - 1, 0) if cfg["ib_mode"] == "pos" else g - 1
        over = np.maximum(delta - cfg["ib_phi"], 0).sum(1)
        return cfg["ib_alpha"] * (delta ** 2).sum(1).mean() + cfg["ib_mu"] * (np.linalg.norm(delta, axis=1) * over).mean()

    def cos_mse(a, b):
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        return np.mean((cos - 1) ** 2)

    def uniform_ce(z):
        s = z @ z.T / cfg["cl_tau"]
        return np.mean(-(s - np.log(np.exp(s).sum(1, keepdims=True))).mean(1))

    # z: M x B x D, one row per BATCH row (repeats included); M = 2, so the pairs are (0,1) and
    # (1,0) and the upper half of the bands (b >= M // 2) is band 1.
    def cross_band(z):
        return (2 * cos_mse(z[0], z[1]) + uniform_ce(z[1])) / 2  # / M(M-1)

    def cross_modal(z):  # chunks ID | image in each band: 2 ordered pairs per band
        return sum(2 * cos_mse(z[b][:, :2], z[b][:, 2:]) for b in range(2)) / 4 + uniform_ce(z[1]) / 4  # / C(C-1)M

    consistency = cross_band if cfg["consistency"] == "cross_band" else cross_modal
    parts = {"rec": rec, "ib": ib(g_u) + ib(g_i), "cl": consistency(z_u[:, users]) + consistency(z_i[:, pos])}
    total = rec + cfg["ib_weight"] * parts["ib"] + cfg["cl_weight"] * parts["cl"]
    return total, parts, (e_u, e_i), (g_u, g_i), (z_u, z_i)


def test_fitmm_item_graph_is_the_hand_knn_graph():
    close(_fitmm().item_graph.to_dense(), S_IMAGE)


def test_fitmm_embeddings_match_the_numpy_reference():
    model = _fitmm()
    users, items = model.embed()
    _, _, (e_u, e_i), _, _ = fitmm_reference(model, [0], [0], [3])
    close(users, e_u, 1e-4)
    close(items, e_i, 1e-4)


# Batch A: users {0, 1} (u2 absent), positives i0, i1 (i1 twice), negatives i3, i2.
# Batch B: items {0, 1, 3} only (i2 absent); the only positive, i1, is NOT the batch's first item.
BATCHES = {"A": ([0, 0, 1], [0, 1, 1], [3, 2, 3]), "B": ([1, 0, 1], [1, 1, 1], [3, 3, 0])}


VARIANTS = {"released": {}, "dual-bpr-cross_modal": dict(gate="dual", ib_mode="dual", loss="bpr", consistency="cross_modal")}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("which", sorted(BATCHES))
def test_fitmm_loss_matches_the_numpy_reference(which, variant):
    model = _fitmm(**VARIANTS[variant])
    if variant != "released":  # the dual gates of this seed do shrink some bands, so 'dual' IB differs from 'pos'
        assert (model.item_gate(model._views()[2]) < 1).any()
    loss, parts = model.loss(batch(*BATCHES[which]))
    total, expected, *_ = fitmm_reference(model, *BATCHES[which])
    for key in ("rec", "ib", "cl"):
        close(parts[key], expected[key], 1e-4)
    close(loss, total, 1e-4)


def test_fitmm_ib_term_takes_the_gates_of_all_users_and_items():
    """Not just the batch's: with batch B (u2 and i2 absent) the two differ, and the loss has the former."""
    model = _fitmm()
    users, pos, neg = BATCHES["B"]
    _, parts = model.loss(batch(users, pos, neg))
    _, expected, _, (g_u, g_i), _ = fitmm_reference(model, users, pos, neg)
    close(parts["ib"], expected["ib"], 1e-4)
    in_batch = [sorted(set(users)), sorted(set(pos + neg))]
    cfg = model.config
    delta = [np.maximum(g[rows] - 1, 0) for g, rows in zip((g_u, g_i), in_batch)]
    batch_only = sum(cfg["ib_alpha"] * (d ** 2).sum(1).mean()
                     + cfg["ib_mu"] * (np.linalg.norm(d, axis=1) * np.maximum(d - cfg["ib_phi"], 0).sum(1)).mean()
                     for d in delta)
    assert abs(parts["ib"] - batch_only) > 1e-3


def test_fitmm_consistency_takes_the_batch_users_and_positive_items():
    """Negatives do not enter the consistency term; the positives do, each as often as it occurs."""
    model = _fitmm()
    users, pos, neg = BATCHES["A"]
    _, parts = model.loss(batch(users, pos, neg))
    _, other_negatives = model.loss(batch(users, pos, [2, 3, 0]))
    assert other_negatives["cl"] == pytest.approx(parts["cl"], rel=1e-6)
    _, other_positives = model.loss(batch(users, [0, 0, 1], neg))
    assert abs(other_positives["cl"] - parts["cl"]) > 1e-4


def test_fitmm_without_item_graph_drops_the_enhanced_item_view():
    model = _fitmm(item_graph=False)
    x_u, h_u, x_i, h_i = model._views()
    assert h_i is None
    _, _, (e_u, e_i), _, _ = fitmm_reference(_fitmm(), [0], [0], [3])  # with the graph, for contrast
    _, items = model.embed()
    assert not np.allclose(items.detach().numpy(), e_i, atol=1e-3)

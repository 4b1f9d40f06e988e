"""A deterministic synthetic multimodal dataset: the built-in default data.

Users and items are drawn around latent cluster centres; a user picks items with probability
proportional to exp(affinity) x popularity; each content modality is a noisy random projection of
the item's latent vector. Content therefore carries real signal about who likes an item, so a
multimodal model has something to gain over ID-only ones, as on real data.
"""

from __future__ import annotations

import numpy as np

from .dataset import Dataset, interaction_matrix


def split_per_user(users: np.ndarray, items: np.ndarray, rng: np.random.Generator, ratios=(0.8, 0.1, 0.1)):
    """Label each (user, item) row 0/1/2, shuffling within each user and cutting 8:1:1.

    Users with at least 3 interactions get at least one validation and one test item.
    """
    labels = np.zeros(len(users), dtype=np.int64)
    order = np.lexsort((rng.random(len(users)), users))  # by user, random within user
    starts = np.flatnonzero(np.r_[True, users[order][1:] != users[order][:-1]])
    ends = np.r_[starts[1:], len(order)]
    for start, end in zip(starts, ends):
        n = end - start
        if n < 3:
            continue
        n_test = max(1, int(round(n * ratios[2])))
        n_valid = max(1, int(round(n * ratios[1])))
        rows = order[start:end]
        labels[rows[n - n_test:]] = 2
        labels[rows[n - n_test - n_valid:n - n_test]] = 1
    return labels


def generate(
    users: int = 1500,
    items: int = 1000,
    clusters: int = 12,
    latent_dim: int = 16,
    mean_interactions: int = 24,
    popularity: float = 0.8,
    feature_dims: dict[str, int] | None = None,
    feature_noise: float = 0.5,
    seed: int = 0,
) -> Dataset:
    """Generate the dataset; the same arguments always give the same data."""
    feature_dims = {"image": 128, "text": 64} if feature_dims is None else feature_dims
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, latent_dim))
    item_cluster = rng.integers(clusters, size=items)
    user_cluster = rng.integers(clusters, size=users)
    item_latent = centres[item_cluster] + 0.5 * rng.normal(size=(items, latent_dim))
    user_latent = centres[user_cluster] + 0.5 * rng.normal(size=(users, latent_dim))

    # Zipf-like popularity over a random item order.
    log_pop = -popularity * np.log1p(rng.permutation(items))
    counts = np.clip(rng.poisson(mean_interactions - 5, size=users) + 5, 5, items // 2)

    rows_u, rows_i = [], []
    for u in range(users):
        logits = user_latent[u] @ item_latent.T / np.sqrt(latent_dim) + log_pop
        gumbel = rng.gumbel(size=items)  # top-k of logits + Gumbel = sampling without replacement
        chosen = np.argpartition(-(logits + gumbel), counts[u])[: counts[u]]
        rows_u.append(np.full(counts[u], u))
        rows_i.append(chosen)
    u_arr, i_arr = np.concatenate(rows_u), np.concatenate(rows_i)

    # Every item gets at least one interaction, so the item count read back from a file is `items`.
    unseen = np.setdiff1d(np.arange(items), i_arr)
    u_arr = np.concatenate([u_arr, rng.integers(users, size=unseen.size)])
    i_arr = np.concatenate([i_arr, unseen])
    pairs = np.unique(np.stack([u_arr, i_arr], axis=1), axis=0)
    u_arr, i_arr = pairs[:, 0], pairs[:, 1]

    labels = split_per_user(u_arr, i_arr, rng)
    if unseen.size:  # keep the padding rows in training so unseen items never land only in test
        padded = np.isin(i_arr, unseen)
        labels[padded] = 0

    features = {}
    for name, dim in feature_dims.items():
        projection = rng.normal(size=(latent_dim, dim)) / np.sqrt(latent_dim)
        signal = item_latent @ projection
        noise = feature_noise * signal.std() * rng.normal(size=signal.shape)
        features[name] = (signal + noise).astype(np.float32)

    splits = {
        name: interaction_matrix(u_arr[labels == k], i_arr[labels == k], users, items)
        for k, name in enumerate(("train", "valid", "test"))
    }
    return Dataset(name="synthetic", n_users=users, n_items=items, features=features, source="synthetic", **splits)


def from_config(config: dict) -> Dataset:
    return generate(
        users=config["synthetic_users"],
        items=config["synthetic_items"],
        clusters=config["synthetic_clusters"],
        latent_dim=config["synthetic_latent_dim"],
        mean_interactions=config["synthetic_mean_interactions"],
        popularity=config["synthetic_popularity"],
        feature_dims=config["synthetic_feature_dims"],
        feature_noise=config["synthetic_feature_noise"],
        # The data does not change with the training seed: seeds vary the model, not the benchmark.
        seed=0,
    )

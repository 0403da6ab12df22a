"""The datasets, all offline: sklearn's digits, generated moons/circles/line, MNIST and Fashion-MNIST from
local files, and two generated sequence tasks: the adding problem and a token recall task. Arrays are float32
features (or int64 tokens) and labels (float32 targets for regression).

Input layouts (`in_kind`): "features" [N, F] (the convolutional models read a square number of features as a
one-channel image); "sequence" [N, T, F] (adding); "tokens" [N, T] int64 (recall)."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
from sklearn import datasets as skd
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

DATASETS = ("digits", "moons", "circles", "mnist", "fashion_mnist", "line", "adding", "recall")
REGRESSION = ("line", "adding")  # real-valued targets: trained with MSE, out_dim 1

_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
SOURCES = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/ (or `keras.datasets.mnist` -> mnist.npz)",
    "fashion_mnist": "https://github.com/zalandoresearch/fashion-mnist#get-the-data",
}


class DataFilesMissing(FileNotFoundError):
    pass


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped): the big-endian format MNIST ships in."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        zero, dtype_code, ndim = struct.unpack(">HBB", f.read(4))
        if zero != 0 or dtype_code != 0x08:
            raise ValueError(f"{path} is not an unsigned-byte IDX file")
        shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(shape)


def load_idx_dir(name: str, path: str | Path) -> dict[str, np.ndarray]:
    """x_train, y_train, x_test, y_test from `path`: an .npz file or a folder of IDX files / one npz."""
    path = Path(path)
    npz = path if path.suffix == ".npz" else path / f"{name}.npz"
    if npz.is_file():
        with np.load(npz) as z:
            return {k: z[k] for k in _IDX_FILES}
    arrays = {}
    for key, stem in _IDX_FILES.items():
        found = [p for p in (path / stem, path / f"{stem}.gz") if p.is_file()]
        if not found:
            raise DataFilesMissing(
                f"data={name}: no {npz.name} and no {stem}[.gz] in {path.resolve()}. Download the four IDX "
                f"files from {SOURCES[name]} into that folder, or set data.path (or $GRADFLOW_DATA_DIR); "
                "data=digits runs offline with no files."
            )
        arrays[key] = read_idx(found[0])
    return arrays


def adding(n: int, seq_len: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The adding problem (Hochreiter & Schmidhuber 1997; the form of Le et al. 2015): each step holds a value
    drawn from U(0, 1) and a marker, 1 at one step of the first half and one of the second, else 0; the target
    is the sum of the two marked values. Predicting its mean (1) scores an MSE of 1/6 (two U(0, 1) variances)."""
    values = rng.random((n, seq_len))
    marks = np.zeros((n, seq_len))
    half = max(seq_len // 2, 1)
    first, second = rng.integers(0, half, n), rng.integers(half, seq_len, n) if seq_len > 1 else np.zeros(n, int)
    marks[np.arange(n), first] = 1.0
    marks[np.arange(n), second] = 1.0
    x = np.stack([values, marks], axis=2)
    return x, (values * marks).sum(axis=1, keepdims=True)


def recall(n: int, seq_len: int, vocab: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A token task for attention: a sequence of random tokens; the label is the first one. A model that reads
    its answer at the last position must carry the first token across the sequence."""
    x = rng.integers(0, vocab, (n, seq_len))
    return x, x[:, 0].copy()


def in_kind(name: str) -> str:
    """How the samples of dataset `name` are laid out (see the module docstring)."""
    return {"adding": "sequence", "recall": "tokens"}.get(name, "features")


def load_arrays(name: str, seed: int, **opts) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_val, y_val): float32 features (int64 tokens) and int64 labels (float32 targets)."""
    val_fraction = float(opts.get("val_fraction", 0.2))
    if name in ("adding", "recall"):  # generated: n_samples for training, a fifth as many more to validate
        rng = np.random.default_rng(seed)
        n, n_val = int(opts["n_samples"]), max(1, int(int(opts["n_samples"]) * val_fraction))
        make = (lambda k: adding(k, int(opts["seq_len"]), rng)) if name == "adding" else \
            (lambda k: recall(k, int(opts["seq_len"]), int(opts["vocab"]), rng))
        (x_tr, y_tr), (x_va, y_va) = make(n), make(n_val)
        kind = np.int64 if name == "recall" else np.float32
        label = np.float32 if name in REGRESSION else np.int64
        return x_tr.astype(kind), y_tr.astype(label), x_va.astype(kind), y_va.astype(label)
    if name in ("mnist", "fashion_mnist"):
        a = load_idx_dir(name, opts["path"])
        x_tr, y_tr = a["x_train"].reshape(len(a["x_train"]), -1) / 255.0, a["y_train"]
        x_va, y_va = a["x_test"].reshape(len(a["x_test"]), -1) / 255.0, a["y_test"]
        if opts.get("limit_train"):
            x_tr, y_tr = x_tr[: int(opts["limit_train"])], y_tr[: int(opts["limit_train"])]
    else:
        if name == "digits":
            x, y = skd.load_digits(return_X_y=True)
        elif name == "moons":
            x, y = skd.make_moons(n_samples=int(opts["n_samples"]), noise=float(opts["noise"]), random_state=seed)
        elif name == "circles":
            x, y = skd.make_circles(
                n_samples=int(opts["n_samples"]), noise=float(opts["noise"]),
                factor=float(opts["factor"]), random_state=seed,
            )
        elif name == "line":  # seed 002: y = slope * x on n evenly spaced points; validation = the same points
            x = np.linspace(0.025, 0.025 * int(opts["n_samples"]), int(opts["n_samples"]))[:, None]
            y = float(opts["slope"]) * x
        else:
            raise ValueError(f"unknown data {name!r}; valid: {', '.join(DATASETS)}")
        if name in REGRESSION:
            x_tr, x_va, y_tr, y_va = x, x, y, y
        else:
            x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=val_fraction, random_state=seed, stratify=y)
    if opts.get("standardize"):
        # StandardScaler leaves zero-variance features unscaled (digits has always-blank pixels in training
        # that are not blank in validation: dividing by a tiny std would turn them into huge inputs)
        scaler = StandardScaler().fit(x_tr)
        x_tr, x_va = scaler.transform(x_tr), scaler.transform(x_va)
    f32, label = np.float32, (np.float32 if name in REGRESSION else np.int64)
    return x_tr.astype(f32), y_tr.astype(label), x_va.astype(f32), y_va.astype(label)

"""The datasets, all offline: sklearn's digits, generated moons/circles/line, MNIST and Fashion-MNIST from
local files, as float32 feature and label arrays."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
from sklearn import datasets as skd
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

DATASETS = ("digits", "moons", "circles", "mnist", "fashion_mnist", "line")
REGRESSION = ("line",)  # real-valued targets: trained with MSE, out_dim 1

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


def load_arrays(name: str, seed: int, **opts) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_val, y_val) as float32 features and int64 labels."""
    val_fraction = float(opts.get("val_fraction", 0.2))
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

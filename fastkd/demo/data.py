"""The demo's data: images as float tensors, split into train / calibration / test with a fixed seed.

``digits`` (the default) is scikit-learn's bundled handwritten digits: 1797 real 8x8 images of 10
classes, shipped inside scikit-learn (no download). ``cifar10`` and ``fashion-mnist`` are read by
torchvision's loaders from files already on disk; nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

DATASETS = ("digits", "cifar10", "fashion-mnist")
SPLIT_SEED = 0


@dataclass
class Splits:
    """Images (N, C, H, W) float32, standardized per channel with the train split's statistics, and
    int64 labels (N,). ``labeled`` indexes the train rows whose labels the students may use."""

    name: str
    classes: list[str]
    x_train: Tensor
    y_train: Tensor
    x_cal: Tensor
    y_cal: Tensor
    x_test: Tensor
    y_test: Tensor
    labeled: Tensor

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "labeled": len(self.labeled), "calibration": len(self.y_cal),
                "test": len(self.y_test)}  # fmt: skip

    def to(self, device: torch.device) -> Splits:
        fields = {name: getattr(self, name) for name in ("x_train", "y_train", "x_cal", "y_cal", "x_test", "y_test")}
        moved = {name: value.to(device) for name, value in fields.items()}
        return Splits(self.name, self.classes, **moved, labeled=self.labeled.to(device))


def _split(name, classes, x, y, x_test, y_test, n_cal: int, n_labeled: int) -> Splits:
    """Hold out ``n_cal`` random rows of (x, y) for calibration; label ``n_labeled`` random train rows."""
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    order = torch.randperm(len(y), generator=gen)
    cal, train = order[:n_cal], order[n_cal:]
    if not 0 < n_labeled <= len(train):
        raise ValueError(f"labeled must be in [1, {len(train)}] (the train split of {name}), got {n_labeled}")
    labeled = torch.randperm(len(train), generator=gen)[:n_labeled].sort().values
    x = x.float()
    mean = x[train].mean(dim=(0, 2, 3), keepdim=True)
    std = x[train].std(dim=(0, 2, 3), keepdim=True)

    def norm(images: Tensor) -> Tensor:
        return (images.float() - mean) / std

    return Splits(name, classes, norm(x[train]), y[train], norm(x[cal]), y[cal], norm(x_test), y_test, labeled)


def _digits_arrays():
    """scikit-learn's digits as ``load_digits(return_X_y=True)`` gives them, (1797, 64) and (1797,).

    Read from the file scikit-learn ships them in, as ``load_digits`` does, without importing
    scikit-learn (2 s, as long as the quick demo's training); ``load_digits`` where the file is not.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise ImportError("the digits data set comes with scikit-learn: pip install scikit-learn (the demo extra)")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        from sklearn.datasets import load_digits

        return load_digits(return_X_y=True)
    import numpy as np

    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1], table[:, -1].astype(int)


def _digits(n_labeled: int) -> Splits:
    images, labels = _digits_arrays()
    x = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(labels, dtype=torch.int64)
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    order = torch.randperm(len(y), generator=gen)
    test, rest = order[:497], order[497:]  # 497 test, 300 calibration, 1000 train
    return _split("digits", [str(d) for d in range(10)], x[rest], y[rest], x[test], y[test], 300, n_labeled)


_TORCHVISION = {
    # name: (torchvision class, what must be under --data-root)
    "cifar10": ("CIFAR10", "cifar-10-batches-py/ (the extracted python version, cifar-10-python.tar.gz)"),
    "fashion-mnist": ("FashionMNIST", "FashionMNIST/raw/ (train-images-idx3-ubyte and the other three idx files)"),
}


def _torchvision(name: str, root: str | None, n_labeled: int) -> Splits:
    cls_name, layout = _TORCHVISION[name]
    if root is None:
        raise ValueError(f"--dataset {name} needs --data-root PATH, the folder that holds {layout}")
    try:
        import torchvision.datasets
    except ImportError as error:
        raise ImportError(f"--dataset {name} reads the files with torchvision: pip install torchvision") from error
    cls = getattr(torchvision.datasets, cls_name)
    try:
        train, test = cls(root, train=True, download=False), cls(root, train=False, download=False)
    except RuntimeError as error:  # torchvision: "Dataset not found or corrupted"
        where = Path(root).resolve()
        raise FileNotFoundError(
            f"{name} was not found under {where}: put {layout} there (the demo never downloads)"
        ) from error

    def tensors(split):
        x = torch.as_tensor(split.data)
        x = x.permute(0, 3, 1, 2) if x.dim() == 4 else x.unsqueeze(1)  # CIFAR is NHWC, Fashion-MNIST NHW
        return x, torch.as_tensor(split.targets, dtype=torch.int64)

    x, y = tensors(train)
    x_test, y_test = tensors(test)
    return _split(name, list(train.classes), x, y, x_test, y_test, 5000, n_labeled)


def load(name: str, root: str | None = None, n_labeled: int | None = None) -> Splits:
    """The splits of data set ``name``; ``n_labeled`` defaults to 200 (digits) or 2000 (the others)."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}; got {name!r}")
    if name == "digits":
        return _digits(200 if n_labeled is None else n_labeled)
    return _torchvision(name, root, 2000 if n_labeled is None else n_labeled)

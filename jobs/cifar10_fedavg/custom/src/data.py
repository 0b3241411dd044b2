"""Datasets shared by the plain script, the FL script and the tests.

Two sources give the same kind of tensors (3x32x32 floats, normalised with mean 0.5 / std 0.5,
labels 0-9), so ``Net`` and the training code never need to know which one is in use:

* ``cifar10``: the real CIFAR-10, read with torchvision from a local folder. Nothing is
  downloaded here (training sites are often offline); ``prepare_data.sh`` fetches it.
* ``digits``: scikit-learn's bundled handwritten digits (1797 real 8x8 images), upscaled to
  3x32x32. It ships with scikit-learn, so the example and its tests run without internet.

``shard`` then gives every FL site its own disjoint part of the training set (``flkit.data.partition``).
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import torch
from flkit.data import partition
from torch.utils.data import Dataset, Subset, TensorDataset

DEFAULT_DATA_PATH = "/tmp/flkit_data/cifar10"
DATASETS = ("cifar10", "digits")

# Fixed seeds: every site and the plain script must see the same test set and the same
# shard boundaries, run after run, whatever else the script seeds.
SPLIT_SEED = 0
SHARD_SEED = 0
DIGITS_TEST_FRACTION = 0.2


def load_datasets(name: str = "cifar10", data_path: str = DEFAULT_DATA_PATH) -> tuple[Dataset, Dataset]:
    """Return ``(trainset, testset)`` for ``name`` ("cifar10" or "digits")."""
    if name == "cifar10":
        return _load_cifar10(data_path)
    if name == "digits":
        return _load_digits()
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def _load_cifar10(data_path: str) -> tuple[Dataset, Dataset]:
    """Read CIFAR-10 from ``data_path`` (never downloads; see prepare_data.sh)."""
    import torchvision  # imported here so the digits path does not pay for it
    import torchvision.transforms as T

    root = Path(data_path)
    if not (root / "cifar-10-batches-py").is_dir():
        raise FileNotFoundError(
            f"CIFAR-10 not found under {root}. Download it first with ./prepare_data.sh "
            f"(from examples/cifar10), pass --data_path to where it lives, "
            f"or use --dataset digits for an offline run."
        )
    transform = T.Compose([T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    trainset = torchvision.datasets.CIFAR10(root=str(root), train=True, download=False, transform=transform)
    testset = torchvision.datasets.CIFAR10(root=str(root), train=False, download=False, transform=transform)
    return trainset, testset


def _load_digits() -> tuple[Dataset, Dataset]:
    """scikit-learn's digits as CIFAR-shaped tensors, with a fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # N x 1 x 8 x 8 in [0, 1]
    images = torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    images = images.repeat(1, 3, 1, 1)  # greyscale -> 3 identical channels, like an RGB image
    images = (images - 0.5) / 0.5  # same normalisation as the CIFAR-10 transform
    labels = torch.tensor(digits.target, dtype=torch.long)

    # Stratified, so that both splits keep the 10 classes in the same proportions.
    train_idx, test_idx = train_test_split(
        range(len(labels)), test_size=DIGITS_TEST_FRACTION, random_state=SPLIT_SEED, stratify=digits.target
    )
    trainset = TensorDataset(images[train_idx], labels[train_idx])
    testset = TensorDataset(images[test_idx], labels[test_idx])
    return trainset, testset


def site_index(site_name: str, num_sites: int) -> int:
    """0-based shard index of ``site_name`` among ``num_sites`` sites.

    ``site-k`` (the names the simulator gives, k = 1..num_sites) maps to k - 1, so sites
    site-1..site-N get N different shards. Any other name maps to a stable CRC32 hash of the
    name modulo ``num_sites``: deterministic across processes and machines (unlike Python's
    ``hash``), but two such names can land on the same shard, so use site-k names whenever
    the shards must be disjoint.
    """
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}")
    match = re.fullmatch(r"site-(\d+)", site_name)
    if match is None:
        return zlib.crc32(site_name.encode("utf-8")) % num_sites
    k = int(match.group(1))
    if not 1 <= k <= num_sites:
        raise ValueError(f"site name {site_name!r} is not one of site-1..site-{num_sites}")
    return k - 1


def shard(dataset: Dataset, site_name: str, num_sites: int, scheme: str = "iid", alpha: float | None = None) -> Subset:
    """The part of ``dataset`` that ``site_name`` trains on, from ``flkit.data.partition``.

    ``scheme="iid"``: a seeded shuffle cut into ``num_sites`` parts whose sizes differ by at most one
    (each site gets a mix of all classes, not e.g. only the first classes of an ordered dataset);
    ``"dirichlet"`` with ``alpha``: label skew (0.1: each site holds a few classes), every site with
    at least one batch's worth of samples. Together the parts of site-1..site-N cover the whole
    dataset exactly once, the same way in every process (a fixed seed).
    """
    index = site_index(site_name, num_sites)
    options = {"alpha": alpha, "min_size": 8} if scheme == "dirichlet" else {}
    split = partition(labels_of(dataset), num_sites, scheme, seed=SHARD_SEED, **options)
    return Subset(dataset, split.indices(f"site-{index + 1}"))


def labels_of(dataset: Dataset) -> list[int]:
    """Every sample's label, without loading the images (both sources keep them apart)."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].tolist()
    targets = getattr(dataset, "targets", None)  # torchvision's CIFAR10
    if targets is None:
        raise TypeError(f"cannot read the labels of a {type(dataset).__name__}")
    return list(targets)

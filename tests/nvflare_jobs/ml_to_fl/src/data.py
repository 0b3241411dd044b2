"""scikit-learn's digits, split into a test set and one training shard per site."""

import torch
from torch.utils.data import TensorDataset


def load(site_name: str = "site-1", num_sites: int = 1):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    test = TensorDataset(x[:360], y[:360])
    index = int(site_name.rsplit("-", 1)[-1]) - 1
    keep = torch.arange(len(y) - 360) % num_sites == index
    return TensorDataset(x[360:][keep], y[360:][keep]), test

"""AUC and log loss in NumPy: the same code scores the FL model (at the sites, and in job.py)
and the popularity baseline, without scikit-learn in the site script."""

from __future__ import annotations

import numpy as np

EPS = 1e-7


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: the chance that a random click scores above a random non-click.

    Rank-based (Mann-Whitney), with tied scores sharing their average rank, so a model that
    gives many impressions the same score (the popularity baseline) is neither helped nor hurt
    by the order of the ties. NaN when ``labels`` has only one class.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based rank, averaged over each tie
    rank_sum = average_rank[inverse][labels].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))


def log_loss(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean binary cross-entropy of predicted click probabilities (clipped away from 0 and 1)."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), EPS, 1 - EPS)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))

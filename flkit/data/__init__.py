"""Data helpers for FL experiments: ``partition`` splits one labelled dataset among sites."""

from flkit.data.partition import SCHEMES, Partition, partition

__all__ = ["SCHEMES", "Partition", "partition"]

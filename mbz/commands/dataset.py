"""Opening the user's data for the commands."""

from __future__ import annotations

from mbz.data import Dataset, load_split


def open_test_split(source: str, data_root: str | None, limit: int | None) -> Dataset:
    """The test split of ``source``, cut to its first ``limit`` images when given."""
    dataset = load_split(source, "test", data_root=data_root)
    if limit is not None:
        dataset = dataset.head(limit)
    return dataset

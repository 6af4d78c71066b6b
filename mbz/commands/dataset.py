"""Opening the user's data for the commands."""

from __future__ import annotations

from collections.abc import Sequence

from mbz.data import Dataset, check_image_shape, load_split


def open_test_split(
    source: str,
    data_root: str | None,
    limit: int | None,
    input_shape: Sequence[int] | None = None,
    model: str = "the model",
) -> Dataset:
    """The test split of ``source``, cut to its first ``limit`` images when given; with
    ``input_shape`` ([C, H, W]), checked to be images of that size (MbzError otherwise)."""
    dataset = load_split(source, "test", data_root=data_root)
    if limit is not None:
        dataset = dataset.head(limit)
    if input_shape is not None:
        check_image_shape(dataset, input_shape, model)
    return dataset

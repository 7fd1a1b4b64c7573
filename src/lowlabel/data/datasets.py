"""Torch datasets over the prepared arrays: N augmented views per image, seeded per sample."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from lowlabel.data.augment import View, sample_seed


class ViewsDataset(Dataset):
    """``images[indices[i]]`` under each of ``views``; returns ``(view_0, ..., view_k, target)``,
    and ``i`` after the target with ``with_position`` (for per-image records, e.g. FlexMatch's).

    ``targets`` are returned alongside for monitoring only (e.g. pseudo-label accuracy);
    -1 where none is given. ``images`` may be a memory map: only the touched rows are read.
    """

    def __init__(
        self,
        images: np.ndarray,
        indices: Sequence[int],
        views: Sequence[View],
        targets: np.ndarray | None = None,
        seed: int = 0,
        with_position: bool = False,
    ) -> None:
        self.images = images
        self.with_position = with_position
        self.indices = np.asarray(indices, dtype=np.int64)
        self.views = list(views)
        self.targets = None if targets is None else np.asarray(targets, dtype=np.int64)
        if self.targets is not None and len(self.targets) != len(self.indices):
            raise ValueError(f"{len(self.targets)} targets for {len(self.indices)} images")
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = int(self.indices[i])
        image = np.asarray(self.images[index])
        out = [view(image, sample_seed(self.seed, self.epoch, index, v)) for v, view in enumerate(self.views)]
        target = -1 if self.targets is None else int(self.targets[i])
        return (*out, torch.tensor(target), *([torch.tensor(i)] if self.with_position else []))


class ImagesDataset(Dataset):
    """``images[indices[i]]`` as a uint8 (C, H, W) tensor, for views made on the training device
    (lowlabel.data.device_augment); returns ``(image, target)``, target -1 where none is given,
    and ``i`` after it with ``with_position``."""

    def __init__(self, images: np.ndarray, indices: Sequence[int], targets: np.ndarray | None = None, with_position: bool = False) -> None:
        self.images = images
        self.with_position = with_position
        self.indices = np.asarray(indices, dtype=np.int64)
        self.targets = None if targets is None else np.asarray(targets, dtype=np.int64)
        if self.targets is not None and len(self.targets) != len(self.indices):
            raise ValueError(f"{len(self.targets)} targets for {len(self.indices)} images")

    def set_epoch(self, epoch: int) -> None:  # the views are seeded per batch, in the loop
        pass

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image = torch.from_numpy(np.array(self.images[int(self.indices[i])], dtype=np.uint8, copy=True)).permute(2, 0, 1)
        target = -1 if self.targets is None else int(self.targets[i])
        return image.contiguous(), torch.tensor(target), *([torch.tensor(i)] if self.with_position else [])

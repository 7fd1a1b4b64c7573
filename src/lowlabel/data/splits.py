"""Deterministic low-label splits.

Novel classes are held out of every training stage (few-shot evaluation only); each base
class gives ``labels_per_class`` labeled training images and the rest of its training
images unlabeled. Test images stay apart. Everything is a function of (labels, params, seed).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lowlabel.errors import UserError


class SplitError(UserError, ValueError):
    """The requested split cannot be made from this data; the message names the field."""


@dataclass(frozen=True)
class Split:
    base_classes: list[int]     # original class ids, in the order of their new ids 0..B-1
    novel_classes: list[int]
    labeled: list[int]          # indices into the training arrays (base classes only)
    unlabeled: list[int]        # indices into the training arrays (base classes only)
    test_base: list[int]        # indices into the test arrays
    test_novel: list[int]       # indices into the test arrays
    seed: int
    train_novel: list[int] = field(default_factory=list)  # novel training images, when data.novel_pool is "all"

    @property
    def pretrain(self) -> list[int]:
        """All base-class training images; their labels are never read by pretraining."""
        return sorted(self.labeled + self.unlabeled)

    def to_json(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def from_json(cls, path: Path) -> Split:
        return cls(**json.loads(path.read_text()))


def _cap_per_class(indices: np.ndarray, labels: np.ndarray, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    if cap is None:
        return indices
    kept = [rng.permutation(indices[labels[indices] == c])[:cap] for c in np.unique(labels[indices])]
    return np.sort(np.concatenate(kept)) if kept else indices


def make_split(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    novel_classes: list[int] | int,
    labels_per_class: int,
    seed: int,
    max_train_per_class: int | None = None,
    max_test_per_class: int | None = None,
    novel_pool: str = "test",
) -> Split:
    """``novel_classes``: explicit class ids, or a count of classes drawn by ``seed``.
    ``novel_pool``: few-shot images of the novel classes from the test split only ("test"),
    or from train and test ("all": Omniglot-style sets with ~20 images per class)."""
    classes = np.unique(np.concatenate([train_labels, test_labels]))
    if isinstance(novel_classes, int):
        if not 0 < novel_classes < len(classes):
            raise SplitError(f"data.novel_classes={novel_classes}: must be between 1 and {len(classes) - 1} (the data has {len(classes)} classes)")
        picker = np.random.default_rng(np.random.SeedSequence([seed, 11]))
        novel_classes = sorted(int(c) for c in picker.choice(classes, novel_classes, replace=False))
    missing = sorted(set(novel_classes) - set(classes.tolist()))
    if missing:
        raise SplitError(f"data.novel_classes: class ids {missing} do not exist; the data has classes {classes.tolist()}")
    base = [int(c) for c in classes if c not in set(novel_classes)]
    if not base:
        raise SplitError(f"data.novel_classes holds every class {classes.tolist()}: no base classes are left to train on")

    rng = np.random.default_rng(seed)
    train_idx = _cap_per_class(np.arange(len(train_labels)), train_labels, max_train_per_class, rng)
    test_idx = _cap_per_class(np.arange(len(test_labels)), test_labels, max_test_per_class, rng)

    labeled: list[int] = []
    unlabeled: list[int] = []
    for c in base:
        members = rng.permutation(train_idx[train_labels[train_idx] == c])
        if len(members) < labels_per_class:
            raise SplitError(
                f"data.labels_per_class is {labels_per_class} but base class {c} has only {len(members)} training images"
            )
        labeled += members[:labels_per_class].tolist()
        unlabeled += members[labels_per_class:].tolist()

    is_novel_test = np.isin(test_labels[test_idx], novel_classes)
    train_novel = train_idx[np.isin(train_labels[train_idx], novel_classes)] if novel_pool == "all" else np.array([], dtype=np.int64)
    return Split(
        base_classes=base,
        novel_classes=sorted(int(c) for c in novel_classes),
        labeled=sorted(int(i) for i in labeled),
        unlabeled=sorted(int(i) for i in unlabeled),
        test_base=[int(i) for i in test_idx[~is_novel_test]],
        test_novel=[int(i) for i in test_idx[is_novel_test]],
        seed=seed,
        train_novel=[int(i) for i in train_novel],
    )

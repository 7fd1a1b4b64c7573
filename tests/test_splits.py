import numpy as np
import pytest

from lowlabel.data.prepared import PreparedData, PreparedDataError
from lowlabel.data.splits import SplitError, make_split


def labels(n_per_class: int, n_classes: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(n_classes), n_per_class))


def test_split_is_deterministic_and_seed_dependent():
    train, test = labels(50, 10), labels(10, 10, seed=1)
    a = make_split(train, test, [5, 6, 7, 8, 9], 4, seed=0)
    b = make_split(train, test, [5, 6, 7, 8, 9], 4, seed=0)
    c = make_split(train, test, [5, 6, 7, 8, 9], 4, seed=1)
    assert a == b
    assert a.labeled != c.labeled


def test_novel_classes_never_reach_training_and_sets_are_disjoint():
    train, test = labels(50, 10), labels(10, 10, seed=1)
    novel = [1, 4, 7]
    split = make_split(train, test, novel, 3, seed=2)
    assert set(split.base_classes) == set(range(10)) - set(novel)
    for indices in (split.labeled, split.unlabeled, split.pretrain):
        assert not set(train[indices].tolist()) & set(novel)
    assert not set(split.labeled) & set(split.unlabeled)
    assert set(split.labeled) <= set(split.pretrain)
    assert sorted(split.pretrain) == sorted(split.labeled + split.unlabeled)
    assert set(test[split.test_novel].tolist()) == set(novel)
    assert not set(test[split.test_base].tolist()) & set(novel)
    # Exactly labels_per_class labels for every base class; every base image is used.
    counts = np.bincount(train[split.labeled], minlength=10)
    assert all(counts[c] == 3 for c in split.base_classes)
    assert len(split.pretrain) == 50 * len(split.base_classes)


def test_caps_per_class():
    train, test = labels(50, 4), labels(30, 4)
    split = make_split(train, test, [3], 2, seed=0, max_train_per_class=10, max_test_per_class=5)
    assert len(split.pretrain) == 30
    assert len(split.test_base) == 15 and len(split.test_novel) == 5


def test_split_errors_name_the_field():
    train, test = labels(5, 4), labels(3, 4)
    with pytest.raises(SplitError, match=r"data.novel_classes.*\[9\]"):
        make_split(train, test, [9], 2, seed=0)
    with pytest.raises(SplitError, match="no base classes"):
        make_split(train, test, [0, 1, 2, 3], 2, seed=0)
    with pytest.raises(SplitError, match=r"data.labels_per_class is 6 but base class \d has only 5"):
        make_split(train, test, [3], 6, seed=0)


def test_prepared_round_trip(tiny_prepared):
    data = PreparedData.load(tiny_prepared)
    assert data.train_images.dtype == np.uint8 and data.train_images.shape[1:] == (16, 16, 1)
    assert isinstance(data.train_images, np.memmap)
    assert data.in_chans == 1 and data.image_size == 16
    assert data.base_label(np.array(data.split.base_classes)).tolist() == list(range(len(data.split.base_classes)))


def test_prepared_missing_files_error(tmp_path):
    with pytest.raises(PreparedDataError, match="dvc repro prepare"):
        PreparedData.load(tmp_path)


def test_novel_classes_as_a_seeded_count_and_the_all_pool():
    train, test = labels(6, 20), labels(2, 20, seed=1)
    a = make_split(train, test, 5, 2, seed=0, novel_pool="all")
    b = make_split(train, test, 5, 2, seed=0, novel_pool="all")
    assert a == b and len(a.novel_classes) == 5
    assert make_split(train, test, 5, 2, seed=1).novel_classes != a.novel_classes
    # "all": every image of a novel class is in the few-shot pool, none in any training set.
    assert sorted(a.train_novel) == sorted(np.flatnonzero(np.isin(train, a.novel_classes)).tolist())
    assert not set(a.train_novel) & set(a.pretrain)
    assert make_split(train, test, 5, 2, seed=0).train_novel == []
    with pytest.raises(SplitError, match="between 1 and 19"):
        make_split(train, test, 20, 2, seed=0)

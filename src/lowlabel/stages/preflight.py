"""What the whole pipeline will need of the prepared data, checked before any training.

Each training stage runs this before it opens an MLflow run or starts Ray, so a setting that
cannot work with this data (a pretraining batch larger than the images, no unlabeled image
left for a semi-supervised method, novel classes too small for the few-shot episodes) stops
the first training stage in a second, naming the settings, instead of failing inside a Ray
worker or in the fewshot stage after every training stage has run. So does a
``runtime.storage_path`` that cannot be written.
"""

from __future__ import annotations

from lowlabel.config import SEMISUP_USES_UNLABELED, Params
from lowlabel.data.prepared import PreparedData
from lowlabel.errors import UserError


class PreflightError(UserError, ValueError):
    """Settings that cannot work with the prepared data; the message names them and the data."""


def pipeline_problems(params: Params, data: PreparedData) -> list[str]:
    """Every problem found, one line each (empty: the settings fit the data)."""
    problems = []
    split = data.split
    pretrain_images = len(split.pretrain)
    if params.pretrain.methods and params.pretrain.batch_size > pretrain_images:
        problems.append(
            f"pretrain.batch_size={params.pretrain.batch_size} is larger than the {pretrain_images} base-class training images "
            f"(data.max_train_per_class={params.data.max_train_per_class})"
        )
    with_unlabeled = [m for m in params.semisup.methods if SEMISUP_USES_UNLABELED[m]]
    if with_unlabeled and not split.unlabeled:
        problems.append(
            f"data.labels_per_class={params.data.labels_per_class} labels every base-class training image: "
            f"semisup.methods {with_unlabeled} need unlabeled images"
        )
    pool = data.novel_pool_labels()
    need = max(params.fewshot.shots) + params.fewshot.queries
    # Over the split's novel classes, not the pool's labels: a class with no image is short too.
    counts = {int(c): int((pool == c).sum()) for c in split.novel_classes}
    short = {c: n for c, n in counts.items() if n < need}
    if short:
        problems.append(
            f"fewshot.shots (up to {max(params.fewshot.shots)}) + fewshot.queries ({params.fewshot.queries}) need {need} images of "
            f"every novel class; data.novel_pool={params.data.novel_pool!r} has fewer for class(es) {short} (class: images)"
        )
    return problems


def check_before_training(params: Params, data: PreparedData) -> None:
    problems = pipeline_problems(params, data)
    if problems:
        raise PreflightError(f"{data.root}: " + "; ".join(problems))


def check_storage(params: Params) -> None:
    """``runtime.storage_path`` takes a write before any MLflow run or Ray starts (a path under a
    file, a read-only mount, a missing bucket): StorageError naming it. The runner checks again,
    from every node of a cluster, once Ray is up."""
    from lowlabel.runner.storage import Storage

    Storage.parse(params.runtime.storage_path).check_writable()

"""``params.yaml`` parsed into typed, validated objects — the only place that reads it.

Every other module takes plain arguments (or one of these sections). A wrong key, type or
value fails here, before any Ray worker starts, with the file, the field's dotted path, the
value given and what is allowed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lowlabel.errors import UserError

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Probability = Annotated[float, Field(gt=0, le=1)]

PRETRAIN_METHODS = ("simclr", "moco", "byol", "barlowtwins", "vicreg", "rotnet", "dino")
# The semi-supervised methods and whether each needs unlabeled images: what the preflight check
# (run by every training stage, pretrain included) must know of them without importing their
# code (lowlabel.methods.semisup; a test checks each SemisupMethod's ``uses_unlabeled`` agrees).
SEMISUP_USES_UNLABELED: dict[str, bool] = {
    "fixmatch": True,
    "uda": True,
    "freematch": True,
    "flexmatch": True,
    "mixmatch": True,
    "pseudolabel": True,
    "meanteacher": True,
    "supervised": False,
}
SEMISUP_METHODS = tuple(SEMISUP_USES_UNLABELED)
META_METHODS = ("protonet", "matchingnet", "relationnet", "maml", "reptile")
# finetune needs the encoder, not cached embeddings, and is slow on CPU: never a default.
# lowlabel.fewshot.protocol.HEAD_NAMES (the heads registry + finetune) names the same (a test checks).
FEWSHOT_HEADS = ("protonet", "linear", "cosine", "knn", "matchingnet", "finetune")


class ConfigError(UserError, ValueError):
    """A problem in params.yaml, phrased for the person who edits it."""


class _Section(BaseModel):
    # Unknown keys are typos until proven otherwise.
    model_config = ConfigDict(extra="forbid", frozen=True)


class GlyphsConfig(_Section):
    num_classes: PositiveInt = 1200
    instances_per_class: Annotated[int, Field(ge=2)] = 20


class DataConfig(_Section):
    source: Literal["fashion_mnist", "imagefolder", "cifar10", "stl10", "glyphs"] = "fashion_mnist"
    root: str | None = None
    download: bool = False
    image_size: PositiveInt | None = None
    channels: Literal[1, 3] | None = None
    # Class ids held out of training, or a count of classes to draw by seed.
    novel_classes: list[Annotated[int, Field(ge=0)]] | PositiveInt = Field(default_factory=lambda: [5, 6, 7, 8, 9])
    novel_pool: Literal["test", "all"] = "test"
    labels_per_class: PositiveInt = 4
    max_train_per_class: PositiveInt | None = None
    max_test_per_class: PositiveInt | None = None
    on_corrupt: Literal["skip", "error"] = "skip"
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    glyphs: GlyphsConfig = GlyphsConfig()
    # imagefolder decoding in prepare: worker processes (a count, or "auto": the CPUs prepare may
    # use) and images per decode task. Prepare holds at most 2 x workers x chunk decoded images in
    # memory, whatever the dataset's size; the output does not depend on either. exclude=True: not
    # in model_dump, so they do not enter the params hash that names training runs (runner.jobs).
    decode_workers: int | Literal["auto"] = Field(default="auto", exclude=True)
    decode_chunk: Annotated[int, Field(gt=0, le=65536)] = Field(default=128, exclude=True)

    @field_validator("decode_workers", mode="before")
    @classmethod
    def _decode_workers(cls, value: Any) -> int | str:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            return value
        raise ValueError("must be a positive integer or 'auto' (one decode process per CPU prepare may use)")

    @field_validator("novel_classes")
    @classmethod
    def _distinct(cls, value: list[int] | int) -> list[int] | int:
        if isinstance(value, int):
            return value
        if not value:
            raise ValueError("novel classes must name at least one class (or give a count): the few-shot stage needs classes no stage trained on")
        if len(set(value)) != len(value):
            raise ValueError(f"novel classes must be distinct, got {value}")
        return sorted(value)


class EncoderConfig(_Section):
    # conv4: the few-shot literature's 4-block ConvNet; resnet18_cifar: timm's ResNet-18
    # with a 3x3 stride-1 stem and no max-pool (small images); wrn<depth>_<widen>: the CIFAR
    # Wide-ResNet of FixMatch (wrn28_2; width unused); timm:<name>: any timm model.
    arch: str = "conv4"
    width: PositiveInt = 64

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        wrn = re.fullmatch(r"wrn(\d+)_(\d+)", value)
        if wrn and (int(wrn[1]) - 4) % 6 == 0 and int(wrn[1]) >= 10 and int(wrn[2]) >= 1:
            return value
        if value in ("conv4", "resnet18_cifar") or (value.startswith("timm:") and len(value) > 5):
            return value
        raise ValueError(f"unknown encoder arch {value!r}; allowed: 'conv4', 'resnet18_cifar', 'wrn<depth>_<widen>' (depth 6n+4, e.g. wrn28_2), 'timm:<model name>'")


class RuntimeConfig(_Section):
    # A count, or "auto": resolved when the job starts (lowlabel.runner.launch.resolve_workers),
    # one worker per GPU of the cluster when training on GPU, else per cpus_per_worker CPUs.
    workers: int | Literal["auto"] = 2
    use_gpu: Literal["auto"] | bool = "auto"
    cpus_per_worker: PositiveFloat = 1.0
    loader_workers: Annotated[int, Field(ge=0)] = 0
    storage_path: str = ".ray/results"
    max_failures: Annotated[int, Field(ge=-1)] = 0
    # Explicit cluster address; the RAY_ADDRESS environment variable wins over it.
    ray_address: str | None = None
    # Local embedded Ray only: how many CPUs it may use (null: the machine's count).
    local_num_cpus: PositiveInt | None = None
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    # Where the training views are made: cpu (albumentations per image in the DataLoader), device
    # (batched, per-sample parameters, on the training device: lowlabel.data.device_augment), or
    # auto: device on GPU, and on CPU too (measured faster there: see resolve_augment).
    augment: Literal["auto", "cpu", "device"] = "auto"
    # How a job's prepared data reaches its workers: object_store (one whole copy per node, in
    # memory or Ray's disk fallback), or storage (copied once to runtime.storage_path, read in
    # place: memory-mapped from a shared mount, or by ranged reads into a cache of
    # input_cache_mb per array and worker from a URI): for data larger than a node's memory.
    inputs: Literal["object_store", "storage"] = "object_store"
    input_cache_mb: PositiveInt = 256

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, value: Any) -> int | str:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            return value
        raise ValueError("must be a positive integer or 'auto' (one worker per GPU of the cluster, else per cpus_per_worker CPUs)")


class TrackingConfig(_Section):
    uri: str = "sqlite:///mlflow.db"
    artifact_root: str = "mlartifacts"
    experiment: str = "lowlabel"


class Optim(_Section):
    optimizer: Literal["sgd", "adamw", "lars"] = "sgd"
    lr: PositiveFloat = 0.03
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    nesterov: bool = False
    weight_decay: NonNegFloat = 5e-4
    warmup_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.0
    grad_clip: PositiveFloat | None = None


class SimCLRConfig(_Section):
    temperature: PositiveFloat = 0.1
    proj_hidden_dim: PositiveInt = 512
    proj_dim: PositiveInt = 128
    # Gather negatives from every worker (with gradients); null: on when world size > 1.
    gather_distributed: bool | None = None


class MoCoConfig(_Section):
    temperature: PositiveFloat = 0.2
    proj_hidden_dim: PositiveInt = 512
    proj_dim: PositiveInt = 128
    # Keys in the memory queue; null: sized to the data (see lowlabel.methods.ssl.moco.default_queue_size).
    queue_size: PositiveInt | None = None
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.99
    # Cosine schedule of the momentum up to this value (null: constant momentum).
    momentum_final: Annotated[float, Field(ge=0, le=1)] | None = None
    single_worker_bn_splits: PositiveInt = 4

    @model_validator(mode="after")
    def _momentum_order(self) -> MoCoConfig:
        if self.momentum_final is not None and self.momentum_final < self.momentum:
            raise ValueError(f"momentum_final ({self.momentum_final}) must be >= momentum ({self.momentum})")
        return self



class BYOLConfig(_Section):
    proj_hidden_dim: PositiveInt = 512
    proj_dim: PositiveInt = 128
    pred_hidden_dim: PositiveInt = 512
    # Target momentum, raised to momentum_final on a cosine over training (the paper: 0.996 -> 1).
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.99
    momentum_final: Annotated[float, Field(ge=0, le=1)] = 1.0

    @model_validator(mode="after")
    def _momentum_order(self) -> BYOLConfig:
        if self.momentum_final < self.momentum:
            raise ValueError(f"momentum_final ({self.momentum_final}) must be >= momentum ({self.momentum})")
        return self


class BarlowTwinsConfig(_Section):
    proj_hidden_dim: PositiveInt = 512
    proj_dim: PositiveInt = 512
    # Weight of the off-diagonal (redundancy) term; the paper's 5e-3 at 8192 dimensions.
    lambda_offdiag: PositiveFloat = 0.0051
    # Cross-correlation over every worker's batch; null: on when world size > 1.
    gather_distributed: bool | None = None


class VICRegConfig(_Section):
    proj_hidden_dim: PositiveInt = 512
    proj_dim: PositiveInt = 512
    sim_weight: NonNegFloat = 25.0
    var_weight: NonNegFloat = 25.0
    cov_weight: NonNegFloat = 1.0
    # Variance and covariance over every worker's batch; null: on when world size > 1.
    gather_distributed: bool | None = None


class RotNetConfig(_Section):
    # Hidden width of the rotation classifier on the encoder's features.
    hidden_dim: PositiveInt = 256


class DINOConfig(_Section):
    # Head: 3-layer MLP to a bottleneck, L2-normalised, weight-normalised linear to out_dim.
    proj_hidden_dim: PositiveInt = 512
    bottleneck_dim: PositiveInt = 128
    out_dim: PositiveInt = 4096
    student_temp: PositiveFloat = 0.1
    # The teacher's temperature, linear from warmup_teacher_temp over the first
    # warmup_teacher_temp_fraction of the steps (the paper: 0.04 -> 0.07 over 30 of 100 epochs).
    teacher_temp: PositiveFloat = 0.07
    warmup_teacher_temp: PositiveFloat = 0.04
    warmup_teacher_temp_fraction: Annotated[float, Field(ge=0, le=1)] = 0.3
    # EMA of the teacher's batch-mean output (over the global batch) that centres its outputs.
    center_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    # Teacher momentum, raised to momentum_final on a cosine over training (the paper: 0.996 -> 1).
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.99
    momentum_final: Annotated[float, Field(ge=0, le=1)] = 1.0
    # Multi-crop: 2 global views at the image size + local_crops views at local_crop_size px.
    # The encoder must give the same features at both sizes (Conv-4: both in one 16 px band,
    # e.g. 16 px locals of 28 px images; WRN/ResNet/timm pool globally): checked at the start.
    local_crops: Annotated[int, Field(ge=0)] = 6
    local_crop_size: PositiveInt = 16
    global_crop_scale: tuple[Probability, Probability] = (0.4, 1.0)
    local_crop_scale: tuple[Probability, Probability] = (0.05, 0.4)

    @model_validator(mode="after")
    def _orders(self) -> DINOConfig:
        if self.momentum_final < self.momentum:
            raise ValueError(f"momentum_final ({self.momentum_final}) must be >= momentum ({self.momentum})")
        for name in ("global_crop_scale", "local_crop_scale"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {(low, high)}")
        return self

class PretrainConfig(_Section):
    methods: list[Literal[PRETRAIN_METHODS]] = Field(default_factory=lambda: ["simclr", "moco"])  # type: ignore[valid-type]
    epochs: PositiveInt = 2
    # A floor on the optimiser steps: more whole epochs when `epochs` gives fewer (small folders).
    # The default everywhere (params.yaml, presets, a params file that omits it): a newcomer's
    # small folder is trained enough without knowing the key; 0 keeps a config on its epochs.
    min_steps: Annotated[int, Field(ge=0)] = 200
    batch_size: PositiveInt = 256
    max_steps_per_epoch: PositiveInt | None = None
    optim: Optim = Optim(optimizer="adamw", lr=2e-3, weight_decay=1e-4, warmup_fraction=0.05)
    crop_scale: tuple[Probability, Probability] = (0.2, 1.0)
    eval_every: PositiveInt = 1
    knn_k: PositiveInt = 20
    simclr: SimCLRConfig = SimCLRConfig()
    moco: MoCoConfig = MoCoConfig()
    byol: BYOLConfig = BYOLConfig()
    barlowtwins: BarlowTwinsConfig = BarlowTwinsConfig()
    vicreg: VICRegConfig = VICRegConfig()
    rotnet: RotNetConfig = RotNetConfig()
    dino: DINOConfig = DINOConfig()

    @model_validator(mode="after")
    def _crop(self) -> PretrainConfig:
        if self.crop_scale[0] > self.crop_scale[1]:
            raise ValueError(f"crop_scale must be (low, high) with low <= high, got {self.crop_scale}")
        return self


# Who labels the weak view: the student itself (the papers), or the EMA teacher.
WeakViewTeacher = Literal["student", "ema"]


class _UnlabeledConfig(_Section):
    """What FixMatch, UDA and FreeMatch share: the unlabeled batch and how its weak view is labelled."""

    mu: PositiveInt = 7
    lambda_u: NonNegFloat = 1.0
    teacher: WeakViewTeacher = "student"
    # Distribution alignment (ReMixMatch) of the weak-view probabilities towards a uniform
    # class prior, with a running mean of the model's predictions of this momentum.
    dist_align: bool = False
    dist_align_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.99


class _DebiasConfig(_Section):
    """DebiasPL (Wang et al. 2022) on the pseudo-labels of a thresholding method."""

    # tau: pseudo-labels scaled by prior^-tau and their loss logit-adjusted by tau log prior, the
    # prior a running mean (this momentum) of the weak view's predictions. 0: off (DebiasPL: 0.4).
    debias: NonNegFloat = 0.0
    debias_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.999


class FixMatchConfig(_UnlabeledConfig, _DebiasConfig):
    threshold: Probability = 0.95
    # On by default: at 4 labels/class and 500 steps they take FixMatch from random init from
    # 19 points below supervised-only to 5 above it (bench/semisup_grid.py; numbers in README).
    teacher: WeakViewTeacher = "ema"
    dist_align: bool = True


class UDAConfig(_UnlabeledConfig):
    threshold: Probability = 0.8
    temperature: PositiveFloat = 0.4    # sharpening of the weak-view target
    tsa: Literal["none", "linear", "log", "exp"] = "linear"


class FreeMatchConfig(_UnlabeledConfig):
    # Momentum of the self-adaptive thresholds' running means (the paper's 0.999 is tuned for
    # 2**20 steps; at a few hundred steps it leaves the bar near its 1/C start).
    sat_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.999
    lambda_f: NonNegFloat = 0.01  # the fairness term's weight (USB's default)




class FlexMatchConfig(_UnlabeledConfig, _DebiasConfig):
    # tau: the bar of a fully learned class, and the confidence that records an image as learned.
    threshold: Probability = 0.95
    # Count the never-confident images as one more class in the normalisation (the paper's warm-up).
    threshold_warmup: bool = True


class MixMatchConfig(_Section):
    mu: PositiveInt = 1
    # Sharpening temperature of the guessed labels, Beta(mix_alpha, mix_alpha) for mixup.
    temperature: PositiveFloat = 0.5
    mix_alpha: PositiveFloat = 0.5
    # Weight of the L2 term on the unlabeled part after the linear ramp-up (USB: 100, ramp 0.4).
    lambda_u: NonNegFloat = 100.0
    rampup_fraction: Annotated[float, Field(ge=0, le=1)] = 0.4

class PseudoLabelConfig(_Section):
    mu: PositiveInt = 7
    # alpha_f of Lee (2013): the unlabeled weight after the ramp-up.
    lambda_u: NonNegFloat = 1.0
    # USB's confidence cut-off; 0 is the paper's unthresholded loss.
    threshold: Annotated[float, Field(ge=0, le=1)] = 0.95
    # The weight rises linearly from 0 at rampup_start to lambda_u at rampup_end (fractions of the steps).
    rampup_start: Annotated[float, Field(ge=0, le=1)] = 0.0
    rampup_end: Annotated[float, Field(ge=0, le=1)] = 0.4

    @model_validator(mode="after")
    def _rampup_order(self) -> PseudoLabelConfig:
        if self.rampup_end < self.rampup_start:
            raise ValueError(f"rampup_end ({self.rampup_end}) must be >= rampup_start ({self.rampup_start})")
        return self


class MeanTeacherConfig(_Section):
    mu: PositiveInt = 1
    # Consistency weight after the ramp-up (USB's 50 for softmax MSE).
    lambda_u: NonNegFloat = 50.0
    # Sigmoid ramp-up exp(-5 (1 - t)^2) over this fraction of the steps.
    rampup_fraction: Annotated[float, Field(ge=0, le=1)] = 0.4
    # The teacher is the EMA model (semisup.ema_decay): what makes it Mean Teacher.
    teacher: Literal["ema"] = "ema"


class SupervisedConfig(_Section):
    # Mix the labeled batch: mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019), Beta(mix_alpha, mix_alpha).
    mix: Literal["none", "mixup", "cutmix"] = "none"
    mix_alpha: PositiveFloat = 1.0

class RandAugmentConfig(_Section):
    num_ops: PositiveInt = 2
    magnitude: Annotated[int, Field(ge=0, le=30)] = 10
    cutout: Annotated[float, Field(ge=0, lt=1)] = 0.5


class SemisupConfig(_Section):
    methods: list[Literal[SEMISUP_METHODS]] = Field(default_factory=lambda: ["fixmatch", "supervised"])  # type: ignore[valid-type]
    # Which encoder to start from: a pretrain method's name, or "random".
    init: str = "simclr"
    # The classifier's start: "random" (PyTorch's default init), or "linear_probe": a logistic
    # regression on the starting encoder's frozen features of the labeled images (LP-FT).
    head_init: Literal["random", "linear_probe"] = "random"
    steps: PositiveInt = 500
    eval_every: PositiveInt = 100
    batch_size: PositiveInt = 32
    optim: Optim = Optim(optimizer="sgd", lr=0.03, momentum=0.9, nesterov=True, weight_decay=5e-4)
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.999
    fixmatch: FixMatchConfig = FixMatchConfig()
    uda: UDAConfig = UDAConfig()
    freematch: FreeMatchConfig = FreeMatchConfig()
    flexmatch: FlexMatchConfig = FlexMatchConfig()
    mixmatch: MixMatchConfig = MixMatchConfig()
    pseudolabel: PseudoLabelConfig = PseudoLabelConfig()
    meanteacher: MeanTeacherConfig = MeanTeacherConfig()
    supervised: SupervisedConfig = SupervisedConfig()
    randaugment: RandAugmentConfig = RandAugmentConfig()


class MatchingNetMetaConfig(_Section):
    # Cosine similarities are divided by it before the softmax (Vinyals et al.: 1; a small value
    # sharpens the attention, as a learned scale would).
    temperature: PositiveFloat = 0.1


class RelationNetMetaConfig(_Section):
    # The relation module: an MLP on [class feature, query feature] (our encoders give vectors).
    hidden: PositiveInt = 8
    # How a class's support features are pooled. The paper sums them, which ties the relation
    # module to the training shots: trained at 1-shot, sum scored 23.5% at 5w5s where mean
    # scored 71.1% with the same weights (bench/meta_table.py, glyphs). Mean: any shot count.
    reduce: Literal["sum", "mean"] = "mean"


class MAMLMetaConfig(_Section):
    inner_steps: PositiveInt = 5
    inner_lr: PositiveFloat = 0.4
    first_order: bool = False
    # Meta-SGD: one learnable inner rate per parameter element, initialised to inner_lr.
    learn_lrs: bool = False
    # Adaptation steps on a test episode's support set (Finn et al.: 10 at test, 5 in training).
    test_inner_steps: PositiveInt = 10


class ReptileMetaConfig(_Section):
    inner_steps: PositiveInt = 5
    inner_lr: PositiveFloat = 0.05  # SGD on each episode's data
    # epsilon: phi <- phi + epsilon * mean(W - phi), annealed as meta.optim's schedule anneals lr.
    outer_lr: PositiveFloat = 1.0
    # Inner steps on support and query images (Nichol et al. train on all of the task's data).
    use_query: bool = True
    test_inner_steps: PositiveInt = 10


class MetaConfig(_Section):
    """Episodic meta-training (``meta@<method>``, after semisup)."""

    methods: list[Literal[META_METHODS]] = Field(default_factory=list)  # type: ignore[valid-type]
    # The starting encoder: random, a pretrain method or a semisup method (by name).
    init: str = "random"
    # labels: the labeled base images; pseudo: `pseudo_model`'s confident predictions on the
    # unlabeled base images (class-balanced); unsupervised: each unlabeled image its own class,
    # augmented views as its shots and queries (UMTRA).
    episodes_from: Literal["labels", "pseudo", "unsupervised"] = "labels"
    pseudo_model: str = "fixmatch"  # a semisup method
    pseudo_threshold: Annotated[float, Field(gt=0, lt=1)] = 0.95
    # Keep at most this many pseudo-labeled images per class (the most confident); null: all.
    pseudo_per_class: PositiveInt | None = None
    ways: Annotated[int, Field(ge=2)] = 5
    shots: PositiveInt = 1
    queries: PositiveInt = 5
    meta_batch: PositiveInt = 4  # episodes per optimiser step, over all workers
    steps: PositiveInt = 200
    eval_every: PositiveInt = 50
    # Validation episodes on the base classes' test images at each eval (rank 0).
    eval_episodes: PositiveInt = 100
    optim: Optim = Optim(optimizer="adamw", lr=1e-3, weight_decay=0.0)
    crop_scale: tuple[Probability, Probability] = (0.2, 1.0)  # unsupervised episodes' views
    matchingnet: MatchingNetMetaConfig = MatchingNetMetaConfig()
    relationnet: RelationNetMetaConfig = RelationNetMetaConfig()
    maml: MAMLMetaConfig = MAMLMetaConfig()
    reptile: ReptileMetaConfig = ReptileMetaConfig()


class FewshotFinetuneConfig(_Section):
    """The ``finetune`` head: a copy of the encoder's last block + a new linear layer per episode."""

    steps: PositiveInt = 100
    lr: PositiveFloat = 0.01  # the new linear classifier
    block_lr: PositiveFloat = 1e-4  # the copied last block (Adam: ~lr-sized steps, so small)
    weight_decay: NonNegFloat = 1e-3  # the new classifier only


class FewshotMatchingNetConfig(_Section):
    """The ``matchingnet`` head: softmax over the support set's cosine similarities / temperature."""

    # Vinyals et al. 2016: 1. Training-free, so apart from meta.matchingnet.temperature (meta-training).
    temperature: PositiveFloat = 1.0


class FewshotConfig(_Section):
    ways: list[PositiveInt] = Field(default_factory=lambda: [5])
    shots: list[PositiveInt] = Field(default_factory=lambda: [1, 5])
    queries: PositiveInt = 15
    episodes: PositiveInt = 600
    heads: list[Literal[FEWSHOT_HEADS]] = Field(default_factory=lambda: ["protonet"])  # type: ignore[valid-type]
    feature_norm: Literal["none", "l2", "center", "center_l2"] = "l2"
    distance: Literal["euclidean", "cosine"] = "euclidean"
    knn_k: PositiveInt = 20
    finetune: FewshotFinetuneConfig = FewshotFinetuneConfig()
    matchingnet: FewshotMatchingNetConfig = FewshotMatchingNetConfig()


class Params(_Section):
    seed: Annotated[int, Field(ge=0)] = 0
    data: DataConfig = DataConfig()
    encoder: EncoderConfig = EncoderConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    tracking: TrackingConfig = TrackingConfig()
    pretrain: PretrainConfig = PretrainConfig()
    semisup: SemisupConfig = SemisupConfig()
    meta: MetaConfig = MetaConfig()
    fewshot: FewshotConfig = FewshotConfig()

    @model_validator(mode="after")
    def _cross_section(self) -> Params:
        if self.semisup.init != "random" and self.semisup.init not in self.pretrain.methods:
            raise ValueError(
                f"semisup.init is {self.semisup.init!r}; allowed: 'random' or one of pretrain.methods {self.pretrain.methods}"
            )
        if self.runtime.workers != "auto":  # "auto": checked by with_workers once it is resolved
            _check_batch_split(self, self.runtime.workers, str(self.runtime.workers))
        if self.meta.methods:
            starts = ["random", *self.pretrain.methods, *self.semisup.methods]
            if self.meta.init not in starts:
                raise ValueError(f"meta.init is {self.meta.init!r}; allowed: 'random' or one of pretrain.methods / semisup.methods {starts[1:]}")
            if self.meta.episodes_from == "pseudo" and self.meta.pseudo_model not in self.semisup.methods:
                raise ValueError(
                    f"meta.pseudo_model is {self.meta.pseudo_model!r}; with meta.episodes_from: pseudo it must be one of semisup.methods {self.semisup.methods}"
                )
        # The global batch does not depend on the worker count, so this holds for "auto" too.
        queue = self.pretrain.moco.queue_size
        if "moco" in self.pretrain.methods and queue is not None and queue % self.pretrain.batch_size:
            raise ValueError(
                f"pretrain.moco.queue_size ({queue}) must be a multiple of the global batch pretrain.batch_size ({self.pretrain.batch_size})"
            )
        return self

    def with_workers(self, workers: int, source: str = "params.yaml") -> Params:
        """These params with ``runtime.workers`` set to a resolved count (``auto`` at launch
        time), after the checks that need the count; :class:`ConfigError` when it does not fit."""
        shown = f"auto -> {workers}" if self.runtime.workers == "auto" else str(workers)
        try:
            _check_batch_split(self, workers, shown)
        except ValueError as error:
            raise ConfigError(f"{source}: {error}") from None
        return self.model_copy(update={"runtime": self.runtime.model_copy(update={"workers": workers})})


def _check_batch_split(params: Params, workers: int, shown: str) -> None:
    """Each global batch splits evenly over ``workers``, with >= 2 samples per worker."""
    if params.meta.methods and params.meta.meta_batch % workers:
        raise ValueError(
            f"meta.meta_batch ({params.meta.meta_batch}) must be a multiple of runtime.workers ({shown}): each worker takes as many episodes per step"
        )
    for name, batch in (("pretrain.batch_size", params.pretrain.batch_size), ("semisup.batch_size", params.semisup.batch_size)):
        if batch % workers:
            raise ValueError(f"{name} ({batch}) must be a multiple of runtime.workers ({shown}): it is the global batch, split evenly")
        if batch // workers < 2:
            raise ValueError(f"{name} ({batch}) is too small for runtime.workers ({shown}): BatchNorm needs at least 2 samples per worker")


def _format_errors(error: ValidationError, source: str) -> str:
    problems = []
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"]) or "<top level>"
        if not item["loc"]:  # a cross-field check: its message names the fields
            problems.append(item["msg"].removeprefix("Value error, "))
        elif item["type"] == "extra_forbidden":
            problems.append(f"{path}: unknown key (value {item['input']!r}); check the spelling against README's params table")
        else:
            problems.append(f"{path}: {item['msg'].removeprefix('Value error, ')} (got {item['input']!r})")
    if len(problems) == 1:  # the common case: one line, file, field and value together
        return f"{source}: {problems[0]}"
    return "\n".join([f"{source}: {len(problems)} invalid settings:", *(f"  - {problem}" for problem in problems)])


def parse_params(raw: dict[str, Any], source: str = "params") -> Params:
    """Validate a params mapping; raise :class:`ConfigError` naming every bad field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, source)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such params file (run from the project root, or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    return parse_params(raw, source=str(path))


def flatten(params: BaseModel | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: the shape MLflow params want."""
    mapping = params.model_dump(mode="json") if isinstance(params, BaseModel) else params
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat

"""GPU training throughput, and the CUDA / AMP / channels_last / NCCL paths, through the real Ray Train jobs.

    python bench/gpu_train.py [--preset cifar10_resnet18] [--methods simclr,moco,fixmatch]
        [--epochs 3] [--steps 100] [--images 20000] [--prepared DIR] [--set key=value ...]

Each method runs as the Ray Train job its stage would launch (``lowlabel.runner.jobs``), one
worker with one GPU, on CIFAR-shaped data: ``--prepared DIR`` (a prepare stage's output) or,
offline, synthetic 32x32 RGB images (throughput does not depend on the pixels; the accuracy
columns then mean nothing). A probe job first checks that the worker's process group is NCCL
and that a gradient-carrying all_gather and an all_reduce run on the GPU.

Prints one table: method, arch, per-GPU batch, AMP dtype, images/s of the full job step
(loader + augmentation + forward + backward + step; epochs after the first), images/s of the
bare forward+backward+step of the same model and batch on tensors already on the GPU, and
their ratio. Needs a CUDA GPU; exits with a message without one.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lowlabel.env import configure_quiet_env

configure_quiet_env()

import ray.train

from lowlabel.config import Params, parse_params
from lowlabel.data.prepared import PreparedData, channel_stats, write_prepared
from lowlabel.data.splits import make_split
from lowlabel.methods.semisup import SEMISUP_REGISTRY
from lowlabel.methods.ssl import PRETRAIN_METHODS
from lowlabel.models.encoders import build_encoder, feature_dim
from lowlabel.models.heads import Classifier
from lowlabel.presets import PRESETS_DIR, merge, set_param
from lowlabel.runner.job_config import JobConfig
from lowlabel.runner.jobs import common_config, pretrain_job, semisup_job
from lowlabel.runner.launch import run_training_job
from lowlabel.runner.worker import read_state, setup_worker
from lowlabel.train.optim import build_optimizer
from lowlabel.train.pretrain import pretrain_loop
from lowlabel.train.semisup import semisup_loop


def nccl_probe_loop(config: dict) -> None:
    """Inside a Ray Train worker: which backend, and do the collectives we use run on the GPU."""
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_fn

    ctx = setup_worker(JobConfig.from_config(config))
    x = torch.arange(6.0, device=ctx.device).reshape(2, 3).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # see lowlabel.distributed.gather_distributed
        gathered = torch.cat(dist_fn.all_gather(x), dim=0)
    (gathered * 2).sum().backward()
    total = torch.ones(1, device=ctx.device)
    dist.all_reduce(total)
    probe = {
        "backend": dist.get_backend(),
        "world": dist.get_world_size(),
        "device": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu",
        "gathered_rows": int(gathered.shape[0]),
        "grad_ok": bool(torch.equal(x.grad, torch.full_like(x, 2.0 * dist.get_world_size()))),
        "all_reduce": float(total.item()),
        "amp": str(ctx.amp_dtype),
    }
    # Ray Train V2 hands back the metrics of checkpointed reports only: ship the probe as one.
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "probe.json").write_text(json.dumps(probe))
        ray.train.report(probe, checkpoint=ray.train.Checkpoint.from_directory(directory))


def synthetic_cifar(out: Path, params: Params, images: int, test: int = 2000) -> None:
    rng = np.random.default_rng(params.seed)
    train_x = rng.integers(0, 256, (images, 32, 32, 3), dtype=np.uint8)
    test_x = rng.integers(0, 256, (test, 32, 32, 3), dtype=np.uint8)
    train_y, test_y = rng.integers(0, 10, images), rng.integers(0, 10, test)
    cfg = params.data
    split = make_split(train_y, test_y, cfg.novel_classes, cfg.labels_per_class, params.seed)
    mean, std = channel_stats(train_x[split.pretrain], seed=params.seed)
    info = {"source": "synthetic", "class_names": [str(c) for c in range(10)], "mean": mean, "std": std, "skipped": []}
    write_prepared(out, train_x, train_y, test_x, test_y, split, info)


def bare_images_per_s(params: Params, method: str, data: PreparedData, amp_dtype: torch.dtype | None, device: torch.device, steps: int = 30) -> float:
    """Forward+backward+step of the same model and per-GPU batch on tensors already on the device."""
    encoder = build_encoder(params.encoder.arch, data.in_chans, params.encoder.width)
    dim = feature_dim(encoder, data.in_chans, data.image_size)
    size = (data.in_chans, data.image_size, data.image_size)
    if method in PRETRAIN_METHODS:
        config, _ = pretrain_job(params, method)
        model = PRETRAIN_METHODS[method](encoder, dim, **config["method_kwargs"])
        batch = params.pretrain.batch_size
        inputs = [torch.randn(batch, *size, device=device) for _ in range(model.num_views)]
        images = batch * model.num_views

        def forward():
            return model([v.contiguous(memory_format=torch.channels_last) for v in inputs])["loss"]
    else:
        config, _ = semisup_job(params, method, None)
        model = Classifier(encoder, dim, len(data.split.base_classes))
        batch, kwargs = params.semisup.batch_size, dict(config["method_kwargs"])
        x, y = torch.randn(batch, *size, device=device), torch.randint(0, len(data.split.base_classes), (batch,), device=device)
        images = batch
        spec = SEMISUP_REGISTRY[method]
        if spec.uses_unlabeled:
            mu = kwargs["mu"]
            u = [torch.randn(batch * mu, *size, device=device) for _ in range(2)]
            kwargs |= dict(u_weak=u[0], u_strong=u[1], u_true=torch.zeros(batch * mu, dtype=torch.long, device=device))
            images += 2 * batch * mu
        # As the loop does: the EMA teacher (here a frozen copy: same cost) and the running statistics.
        teacher = copy.deepcopy(model).to(device, memory_format=torch.channels_last).eval() if kwargs.get("teacher") == "ema" else None
        kwargs |= {"teacher": teacher} | {k: m.to(device) for k, m in spec.make_state(len(data.split.base_classes), kwargs).items()}

        def forward():
            return spec.step(model, x.contiguous(memory_format=torch.channels_last), y, step=0, total_steps=1000, **kwargs)["loss"]
    model.to(device, memory_format=torch.channels_last).train()
    optimizer, _ = build_optimizer(model, 1000, **config["optim"])

    def step():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = forward()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(5):
        step()
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * images / (time.perf_counter() - started)


def build_params(args: argparse.Namespace, gpu: bool) -> Params:
    raw = Params().model_dump(mode="json")
    if args.preset:
        raw = merge(raw, yaml.safe_load((PRESETS_DIR / f"{args.preset}.yaml").read_text()) or {})
    overrides = {
        "runtime": {"workers": 1, "use_gpu": gpu, "amp": args.amp, "loader_workers": args.loader_workers, "cpus_per_worker": args.loader_workers + 1},
        "pretrain": {"epochs": args.epochs, "min_steps": 0, "max_steps_per_epoch": args.steps, "eval_every": args.epochs},
        "semisup": {"steps": args.epochs * args.steps, "eval_every": args.steps},
    }
    raw = merge(raw, overrides)
    for item in args.set:
        set_param(raw, *item.split("=", 1))
    return parse_params(raw, source="bench/gpu_train.py")


def mean_after_first(history: list[dict], key: str = "images_per_s") -> float:
    values = [h[key] for h in history if key in h]
    return float(np.mean(values[1:] if len(values) > 1 else values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cifar10_resnet18")
    parser.add_argument("--methods", default="simclr,moco,fixmatch")
    parser.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "off"])
    parser.add_argument("--epochs", type=int, default=3, help="epochs (pretrain) / chunks (semisup) timed; the first is warm-up")
    parser.add_argument("--steps", type=int, default=100, help="steps per epoch / chunk")
    parser.add_argument("--images", type=int, default=20000, help="synthetic training images")
    parser.add_argument("--loader-workers", type=int, default=8)
    parser.add_argument("--prepared", default=None, help="a prepare stage's data/prepared (default: synthetic CIFAR-shaped)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--cpu-smoke", action="store_true", help="run the same plumbing on CPU (a smoke test, not a measurement)")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    if not gpu and not args.cpu_smoke:
        sys.exit("bench/gpu_train.py needs a CUDA GPU (none visible); --cpu-smoke runs the plumbing on CPU")
    device = torch.device("cuda" if gpu else "cpu")
    params = build_params(args, gpu)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lowlabel-gpu-"))
    data_dir = Path(args.prepared) if args.prepared else workdir / "prepared"
    if not args.prepared:
        synthetic_cifar(data_dir, params, args.images)
    data = PreparedData.load(data_dir)
    storage = str(workdir / "ray")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[args.amp]

    def job(loop, config, name):
        result = run_training_job(
            loop, {**common_config(params, data_dir), **config}, name=name, workers=1, use_gpu=gpu,
            cpus_per_worker=params.runtime.cpus_per_worker, storage_path=storage,
        )
        if result.error is not None:
            raise result.error
        return result

    with job(nccl_probe_loop, {"label": "nccl-probe"}, "nccl-probe").checkpoint.as_directory() as directory:
        probe = json.loads((Path(directory) / "probe.json").read_text())
    print(f"probe: backend={probe['backend']} world={probe['world']} device={probe['device']} amp={probe['amp']} "
          f"all_gather rows={probe['gathered_rows']} grad_ok={probe['grad_ok']} all_reduce={probe['all_reduce']}", flush=True)

    rows = []
    for method in args.methods.split(","):
        if method in PRETRAIN_METHODS:
            config, name = pretrain_job(params, method)
            loop, batch = pretrain_loop, params.pretrain.batch_size
        else:
            params = params.model_copy(update={"semisup": params.semisup.model_copy(update={"init": "random"})})
            config, name = semisup_job(params, method, None)
            loop, batch = semisup_loop, params.semisup.batch_size
        started = time.perf_counter()
        result = job(loop, config, name)
        wall = time.perf_counter() - started
        history = read_state(result.checkpoint)["history"]
        full = mean_after_first(history)
        bare = bare_images_per_s(params, method, data, amp_dtype if gpu else None, device)
        last = history[-1]
        quality = last.get("knn_acc", last.get("test_acc_ema", float("nan")))
        rows.append((method, params.encoder.arch, batch, args.amp, full, bare, full / bare, wall, quality))
        print(f"{method}: {full:.0f} img/s full, {bare:.0f} bare, job {wall:.0f} s", flush=True)

    print(f"\n{torch.cuda.get_device_name() if gpu else 'CPU smoke run'} | loader_workers {args.loader_workers} | {args.epochs} x {args.steps} steps | data {'synthetic' if not args.prepared else data_dir}")
    print(f"{'method':<11}{'arch':<16}{'batch':>6}{'amp':>6}{'full img/s':>12}{'bare img/s':>12}{'full/bare':>10}{'job s':>8}{'acc':>7}")
    for method, arch, batch, amp, full, bare, ratio, wall, quality in rows:
        print(f"{method:<11}{arch:<16}{batch:>6}{amp:>6}{full:>12.0f}{bare:>12.0f}{ratio:>10.2f}{wall:>8.0f}{quality:>7.3f}")


if __name__ == "__main__":
    main()

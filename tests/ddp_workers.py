"""Functions that run in each process of the real multi-process (gloo) DDP tests."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from lowlabel.distributed import batch_shuffle, batch_unshuffle, gather_no_grad
from lowlabel.methods.ssl.moco import MoCo
from lowlabel.methods.ssl.simclr import SimCLR


def init(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def toy_simclr() -> SimCLR:
    """BatchNorm-free, so per-worker batches cannot change the math."""
    torch.manual_seed(0)
    model = SimCLR(nn.Sequential(nn.Linear(6, 8), nn.Tanh()), 8, temperature=0.3, gather_distributed=True)
    model.projector = nn.Linear(8, 5)
    return model.double()


def simclr_views(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randn(n, 6, generator=g, dtype=torch.float64)


def simclr_step(rank: int, world: int, port: int, out: str) -> None:
    init(rank, world, port)
    model = DDP(toy_simclr())
    v1, v2 = simclr_views()
    share = len(v1) // world
    mine = slice(rank * share, (rank + 1) * share)
    loss = model([v1[mine], v2[mine]])["loss"]
    loss.backward()
    losses = gather_no_grad(loss.detach().reshape(1))
    if rank == 0:
        torch.save({"loss": losses.mean(), "grads": [p.grad for p in model.module.parameters()]}, out)
    dist.destroy_process_group()


def toy_moco() -> MoCo:
    torch.manual_seed(0)
    # BN in the encoder: Shuffle-BN is what keeps its statistics honest across workers.
    return MoCo(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)), 5, proj_hidden_dim=7, proj_dim=4, queue_size=12, momentum=0.9)


def moco_steps(rank: int, world: int, port: int, out: str) -> None:
    init(rank, world, port)
    moco = toy_moco()
    model = DDP(moco)
    opt = torch.optim.SGD([p for p in moco.parameters() if p.requires_grad], lr=0.1)
    record = {"queues": [], "ptrs": []}
    for step in range(4):
        g = torch.Generator().manual_seed(100 * step + rank)  # each worker its own data
        views = [torch.randn(2, 6, generator=g), torch.randn(2, 6, generator=g)]
        loss = model(views)["loss"]
        opt.zero_grad()
        loss.backward()
        record["key_grads"] = [p.grad for p in moco.momentum_branch.parameters()]
        opt.step()
        moco.on_train_step_end(step + 1, 4)
        record["queues"].append(moco.queue.clone())
        record["ptrs"].append(int(moco.queue_ptr))
    torch.save(record, f"{out}.{rank}")
    dist.destroy_process_group()


def shuffle_roundtrip(rank: int, world: int, port: int, out: str) -> None:
    init(rank, world, port)
    mine = torch.arange(6, dtype=torch.float32).reshape(3, 2) + 100 * rank
    shuffled, unshuffle = batch_shuffle(mine)
    back = batch_unshuffle(shuffled * 1.0, unshuffle)
    everyone = gather_no_grad(shuffled)
    torch.save({"mine": mine, "shuffled": shuffled, "back": back, "everyone": everyone}, f"{out}.{rank}")
    dist.destroy_process_group()


def moco_enqueue_order(rank: int, world: int, port: int, out: str) -> None:
    """The enqueued block equals the gathered keys in rank order."""
    init(rank, world, port)
    moco = toy_moco()
    keys = F.normalize(torch.full((2, 4), float(rank + 1)) + torch.arange(4.0), dim=1)
    moco.enqueue(gather_no_grad(keys))
    torch.save({"queue": moco.queue.clone(), "keys": keys}, f"{out}.{rank}")
    dist.destroy_process_group()


def dist_align_steps(rank: int, world: int, port: int, out: str) -> None:
    """Each worker aligns its own unlabeled batch; the running mean must be the global one."""
    from lowlabel.methods.semisup.base import DistributionAlignment

    init(rank, world, port)
    aligner = DistributionAlignment(3, momentum=0.5)
    record = {"means": [], "aligned": []}
    for step in range(3):
        g = torch.Generator().manual_seed(10 * step + rank)
        probs = torch.softmax(torch.randn(4, 3, generator=g, dtype=torch.float64), dim=1)
        record["aligned"].append(aligner(probs))
        record["means"].append(aligner.model_mean.clone())
    torch.save(record, f"{out}.{rank}")
    dist.destroy_process_group()


def self_adaptive_threshold_steps(rank: int, world: int, port: int, out: str) -> None:
    """Each worker thresholds its own unlabeled batch; the running statistics must be the union's."""
    from lowlabel.methods.semisup.freematch import SelfAdaptiveThreshold

    init(rank, world, port)
    sat = SelfAdaptiveThreshold(3, momentum=0.5)
    record = {"thresholds": [], "buffers": []}
    for step in range(3):
        g = torch.Generator().manual_seed(10 * step + rank)
        probs = torch.softmax(3 * torch.randn(4, 3, generator=g, dtype=torch.float64), dim=1)
        record["thresholds"].append(sat(probs))
        record["buffers"].append({k: v.clone() for k, v in sat.state_dict().items()})
    torch.save(record, f"{out}.{rank}")
    dist.destroy_process_group()


def toy_decorrelation(method: str):
    """Barlow Twins or VICReg, BatchNorm-free: the batch statistics are the loss's alone."""
    from lowlabel.methods.ssl import PRETRAIN_METHODS

    torch.manual_seed(0)
    model = PRETRAIN_METHODS[method](nn.Sequential(nn.Linear(6, 8), nn.Tanh()), 8, proj_hidden_dim=8, proj_dim=5, gather_distributed=True)
    model.projector = nn.Linear(8, 5)
    return model.double()


def decorrelation_step(method: str, rank: int, world: int, port: int, out: str) -> None:
    init(rank, world, port)
    model = DDP(toy_decorrelation(method))
    v1, v2 = simclr_views(12)
    share = len(v1) // world
    mine = slice(rank * share, (rank + 1) * share)
    loss = model([v1[mine], v2[mine]])["loss"]
    loss.backward()
    losses = gather_no_grad(loss.detach().reshape(1))
    if rank == 0:
        torch.save({"losses": losses, "grads": [p.grad for p in model.module.parameters()]}, out)
    dist.destroy_process_group()


def barlow_twins_step(rank: int, world: int, port: int, out: str) -> None:
    decorrelation_step("barlowtwins", rank, world, port, out)


def vicreg_step(rank: int, world: int, port: int, out: str) -> None:
    decorrelation_step("vicreg", rank, world, port, out)


def flexmatch_record_steps(rank: int, world: int, port: int, out: str) -> None:
    """Each worker records its own unlabeled images; every worker must hold the union's record."""
    from lowlabel.methods.semisup.flexmatch import LearningEffect

    init(rank, world, port)
    effect = LearningEffect(num_unlabeled=16, num_classes=3, threshold=0.5, warmup=True)
    record = {"selected": [], "thresholds": []}
    for step in range(3):
        g = torch.Generator().manual_seed(10 * step + rank)
        probs = torch.softmax(3 * torch.randn(4, 3, generator=g, dtype=torch.float64), dim=1)
        index = torch.arange(4) + 4 * rank + 8 * (step % 2)
        effect.record(index, probs)
        record["selected"].append(effect.selected.clone())
        record["thresholds"].append(effect.thresholds())
    torch.save(record, f"{out}.{rank}")
    dist.destroy_process_group()


def toy_maml_model() -> nn.Module:
    """BatchNorm included: MAML normalises each episode with its own batch, so per-worker episodes are exact."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()


def toy_meta_episode(rank: int):
    """Episode E_{rank+1}: 2-way, 2-shot, 3-query on 3-d inputs."""
    from lowlabel.meta import EpisodicBatch

    g = torch.Generator().manual_seed(50 + rank)
    return EpisodicBatch(
        torch.randn(4, 3, generator=g, dtype=torch.float64),
        torch.tensor([0, 0, 1, 1]),
        torch.randn(6, 3, generator=g, dtype=torch.float64),
        torch.tensor([0, 0, 0, 1, 1, 1]),
        ways=2,
        shots=2,
    )


MAML_STEPS, MAML_LR = 2, 0.3


def maml_meta_grads(rank: int, world: int, port: int, out: str) -> None:
    """Each worker meta-trains on its own episode, second-order MAML, three ways."""
    from lowlabel.meta import MAML, average_gradients, meta_loss

    init(rank, world, port)
    episode = toy_meta_episode(rank)
    record = {}
    # 1. DDP around the MAML module: the inner loop runs inside DDP's one forward.
    for name, learn_lrs in (("ddp", False), ("ddp_meta_sgd", True)):
        maml = MAML(toy_maml_model(), steps=MAML_STEPS, lr=MAML_LR, learn_lrs=learn_lrs)
        ddp = DDP(maml)
        loss = F.cross_entropy(ddp(episode.support_x, episode.support_y, episode.query_x), episode.query_y)
        loss.backward()
        record[name] = {n: p.grad.clone() for n, p in maml.named_parameters()}
    # 2. No DDP: the plain module's meta-gradient, averaged explicitly.
    model = toy_maml_model()
    meta_loss(model, episode, steps=MAML_STEPS, lr=MAML_LR).backward()
    average_gradients(model.parameters())
    record["explicit"] = [p.grad.clone() for p in model.parameters()]
    # The trap: the wrapped module's parameters used outside DDP's forward are never reduced.
    ddp = DDP(toy_maml_model())
    meta_loss(ddp.module, episode, steps=MAML_STEPS, lr=MAML_LR).backward()
    record["outside_forward"] = [p.grad.clone() for p in ddp.module.parameters()]
    torch.save(record, f"{out}.{rank}")
    dist.destroy_process_group()


def reptile_deltas(rank: int, world: int, port: int, out: str) -> None:
    """Each worker runs Reptile on its own meta-batch of two episodes."""
    from lowlabel.meta import reptile_step

    init(rank, world, port)
    model = toy_maml_model()
    episodes = [toy_meta_episode(2 * rank), toy_meta_episode(2 * rank + 1)]
    reptile_step(model, episodes, steps=3, inner_lr=0.1, outer_lr=0.5)
    torch.save({"params": [p.detach().clone() for p in model.parameters()]}, f"{out}.{rank}")
    dist.destroy_process_group()


def toy_dino():
    """BatchNorm-free (the head a plain linear layer), so per-worker batches cannot change the math."""
    from lowlabel.methods.ssl.dino import DINO

    torch.manual_seed(0)
    model = DINO(nn.Sequential(nn.Linear(6, 8), nn.Tanh()), 8, proj_hidden_dim=8, bottleneck_dim=4, out_dim=5, local_crops=2, center_momentum=0.5)
    model.head = nn.Linear(8, 5)
    model.momentum_branch = model.init_momentum_branch(model.encoder, model.head)
    return model.double()


def dino_views(n: int = 8) -> list[torch.Tensor]:
    """2 global + 2 local views of n images."""
    g = torch.Generator().manual_seed(3)
    return [torch.randn(n, 6, generator=g, dtype=torch.float64) for _ in range(4)]


def dino_steps(rank: int, world: int, port: int, out: str) -> None:
    """Two forwards: the first's gradients and centre, the second's loss (with the updated centre)."""
    init(rank, world, port)
    model = DDP(toy_dino())
    views = dino_views()
    share = len(views[0]) // world
    mine = [v[rank * share : (rank + 1) * share] for v in views]
    loss = model(mine)["loss"]
    loss.backward()
    record = {"losses": [gather_no_grad(loss.detach().reshape(1))], "grads": [p.grad for p in model.module.parameters() if p.requires_grad],
              "centers": [model.module.center.clone()]}
    with torch.no_grad():
        record["losses"].append(gather_no_grad(model(mine)["loss"].detach().reshape(1)))
    record["centers"].append(model.module.center.clone())
    torch.save(record, f"{out}.{rank}")
    dist.destroy_process_group()


def sharded_features(rank: int, world: int, port: int, out: str) -> None:
    """Each worker embeds a share of 101 images; rank 1 starts from other weights and BN statistics."""
    import numpy as np

    from lowlabel.data.augment import eval_view
    from lowlabel.evaluation import extract_features_distributed
    from lowlabel.models.encoders import build_encoder

    init(rank, world, port)
    torch.manual_seed(rank)  # replicas that differ, as an EMA teacher's statistics do between DDP broadcasts
    encoder = build_encoder("conv4", 1, 16).to(memory_format=torch.channels_last)
    encoder.train()
    encoder(torch.randn(8, 1, 28, 28).contiguous(memory_format=torch.channels_last))  # rank-specific running stats
    own = {k: v.clone() for k, v in encoder.state_dict().items()}
    images = np.random.default_rng(0).integers(0, 256, (120, 28, 28, 1), dtype=np.uint8)
    indices = np.arange(3, 104)
    features = extract_features_distributed(encoder, images, indices, eval_view([0.3], [0.35]), channels_last=True)
    untouched = all(torch.equal(v, own[k]) for k, v in encoder.state_dict().items())
    torch.save({"features": features, "state": own, "untouched": untouched, "training": encoder.training}, f"{out}.{rank}")
    dist.destroy_process_group()

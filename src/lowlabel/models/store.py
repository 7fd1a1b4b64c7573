"""Encoder files handed between stages: weights plus what is needed to rebuild the module."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowlabel.models.encoders import build_encoder

ENCODER_FILE = "encoder.pt"


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write under a temporary name, then rename: a killed stage never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_encoder(path: Path, state_dict: dict[str, torch.Tensor], *, arch: str, width: int, in_chans: int, **meta: Any) -> None:
    atomic_torch_save({"arch": arch, "width": width, "in_chans": in_chans, "state_dict": state_dict, **meta}, path)


def load_encoder(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the encoder saved at ``path``; returns (module in eval mode, metadata)."""
    # weights_only: encoder files are exchanged, pushed to remotes and downloaded from MLflow;
    # loading one must never run code.
    blob = torch.load(Path(path), map_location="cpu", weights_only=True)
    encoder = build_encoder(blob["arch"], blob["in_chans"], blob["width"])
    encoder.load_state_dict(blob["state_dict"])
    meta = {k: v for k, v in blob.items() if k != "state_dict"}
    return encoder.eval(), meta

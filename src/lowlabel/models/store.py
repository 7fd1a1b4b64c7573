"""Encoder files handed between stages: weights plus what is needed to rebuild the module."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowlabel.atomic import atomic_write
from lowlabel.models.encoders import build_encoder

ENCODER_FILE = "encoder.pt"
# Beside a meta@<method> encoder: the method's whole trained state (head, relation module, inner rates).
META_HEAD_FILE = "meta_head.pt"
# Beside a semisup@<method> encoder: the EMA classifier (encoder + head), for pseudo-labels.
CLASSIFIER_EMA_FILE = "classifier_ema.pt"


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through :func:`lowlabel.atomic.atomic_write`: whole, durable, or absent."""
    # Serialised in memory first: torch's zip writer turns a full disk into a RuntimeError
    # ("unexpected pos"), a plain write reports it as the OSError it is.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getbuffer()))


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

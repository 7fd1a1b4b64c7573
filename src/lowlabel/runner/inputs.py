"""A job's inputs travel with the job, not as paths: the prepared data and the starting encoder
go into Ray's object store once per job, and every worker, on any node, reads them from there.

A worker on another host has no ``data/prepared`` or ``models/`` (the cluster launcher syncs
tracked files only), so a path would name nothing there. ``ray.put`` stores the arrays once per
node that needs them; numpy arrays come back zero-copy (read-only, in shared memory), so the
workers of one node share one copy. Size: inputs larger than a node's object store still
arrive (Ray's fallback allocation backs them with disk-mapped memory; bench/object_store_limit.py
on two hosts: 50, 150 and 300 MB read by a task on a node whose store holds 80 MB), so the limit is
one copy per node in its memory (or its Ray temp disk); a local Ray's store is sized here from
the inputs. Data larger than a node's memory: ``runtime.inputs: storage``
(lowlabel.runner.stored_inputs) reads the images in place from the job's storage.
The single-machine default takes the same path, so every run exercises it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from lowlabel.data.prepared import PreparedData

# Config keys that name a driver-side file the workers need.
DATA_KEY = "data"
INIT_ENCODER_KEY = "init_encoder"


def prepared_nbytes(data_dir: str | Path) -> int:
    data = PreparedData.load(data_dir)
    return sum(a.nbytes for a in (data.train_images, data.train_labels, data.test_images, data.test_labels))


def inputs_nbytes(config: dict[str, Any]) -> int:
    """Bytes the job's inputs take in the object store (to size a local Ray before it starts)."""
    total = prepared_nbytes(config[DATA_KEY]) if isinstance(config.get(DATA_KEY), (str, Path)) else 0
    if isinstance(config.get(INIT_ENCODER_KEY), (str, Path)):
        total += Path(config[INIT_ENCODER_KEY]).stat().st_size
    return total


def load_encoder_state(path: str | Path) -> dict[str, torch.Tensor]:
    """An encoder file's weights. ``weights_only``: a file handed around must not run code."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)["state_dict"]


def ship_inputs(config: dict[str, Any], stage_on: str | None = None, cache_bytes: int = 256 << 20) -> tuple[dict[str, Any], int]:
    """``config`` with its file inputs replaced by object refs, and the bytes shipped.

    With ``stage_on`` (a storage path or URI: ``runtime.inputs: storage``) the prepared data is
    copied there instead (once per content, lowlabel.runner.stored_inputs) and the workers read
    it in place. Ray must be up. The refs live as long as the returned config (the driver
    holds it until the job ends)."""
    shipped, nbytes = dict(config), 0
    if isinstance(config.get(DATA_KEY), (str, Path)) and stage_on is not None:
        from lowlabel.runner.stored_inputs import stage_prepared

        shipped[DATA_KEY], nbytes = stage_prepared(stage_on, config[DATA_KEY], cache_bytes)
    elif isinstance(config.get(DATA_KEY), (str, Path)):
        loaded = PreparedData.load(config[DATA_KEY])
        # Read the memory maps once: the object store holds plain arrays, zero-copy on get.
        in_memory = replace(
            loaded,
            train_images=np.ascontiguousarray(loaded.train_images),
            test_images=np.ascontiguousarray(loaded.test_images),
        )
        nbytes += sum(a.nbytes for a in (in_memory.train_images, in_memory.train_labels, in_memory.test_images, in_memory.test_labels))
        shipped[DATA_KEY] = ray.put(in_memory)
    if isinstance(config.get(INIT_ENCODER_KEY), (str, Path)):
        state = load_encoder_state(config[INIT_ENCODER_KEY])
        nbytes += sum(t.numel() * t.element_size() for t in state.values())
        shipped[INIT_ENCODER_KEY] = ray.put(state)
    return shipped, nbytes


def open_data(handle: Any) -> PreparedData:
    """In a worker: the job's prepared data, from the object store, the job's storage
    (lowlabel.runner.stored_inputs) or a local folder."""
    from lowlabel.runner.stored_inputs import StoredData, open_stored

    if isinstance(handle, ray.ObjectRef):
        return ray.get(handle)
    if isinstance(handle, StoredData):
        return open_stored(handle)
    return PreparedData.load(handle)


def open_init_encoder(handle: Any) -> dict[str, torch.Tensor] | None:
    """In a worker: the starting encoder's weights, or None for random init."""
    if handle is None:
        return None
    if isinstance(handle, ray.ObjectRef):
        return ray.get(handle)
    return load_encoder_state(handle)

"""The self-supervised methods (``SSLMethod`` subclasses), one module each, and their registry by
params.yaml name. The semi-supervised family (``lowlabel.methods.semisup``) never imports this
package, nor this package it, so DVC re-runs no pretraining when only semi-supervised code changes
(tests/test_dvc_deps.py).

Adding a method: one module here subclassing ``SSLMethod``, one line in the registry below, its
name in ``config.PRETRAIN_METHODS`` and its params section.
"""

from lowlabel.methods.ssl.barlow_twins import BarlowTwins
from lowlabel.methods.ssl.base import MomentumSSLMethod, SSLMethod
from lowlabel.methods.ssl.byol import BYOL
from lowlabel.methods.ssl.dino import DINO
from lowlabel.methods.ssl.moco import MoCo
from lowlabel.methods.ssl.rotnet import RotNet
from lowlabel.methods.ssl.simclr import SimCLR
from lowlabel.methods.ssl.vicreg import VICReg

# lowlabel.config.PRETRAIN_METHODS names the same keys (config imports no methods; a test checks).
PRETRAIN_METHODS: dict[str, type[SSLMethod]] = {
    method.name: method for method in (SimCLR, MoCo, BYOL, BarlowTwins, VICReg, RotNet, DINO)
}

__all__ = [
    "BYOL",
    "DINO",
    "PRETRAIN_METHODS",
    "BarlowTwins",
    "MoCo",
    "MomentumSSLMethod",
    "RotNet",
    "SSLMethod",
    "SimCLR",
    "VICReg",
]

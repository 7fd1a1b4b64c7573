"""Training methods: self-supervised (``SSLMethod`` subclasses) and semi-supervised ones
(``SemisupMethod``: a step function and its running statistics, one module each).

This package's ``__init__`` runs whenever any method module is imported, so it holds only the
self-supervised registry: the pretrain stage then never loads semi-supervised code, and DVC
does not re-run pretraining when only that code changes (tests/test_dvc_deps.py). The
semi-supervised registry is ``lowlabel.methods.semisup_registry.SEMISUP_REGISTRY``.
"""

from lowlabel.methods.barlow_twins import BarlowTwins
from lowlabel.methods.base import MomentumSSLMethod, SSLMethod
from lowlabel.methods.byol import BYOL
from lowlabel.methods.moco import MoCo
from lowlabel.methods.rotnet import RotNet
from lowlabel.methods.simclr import SimCLR
from lowlabel.methods.vicreg import VICReg

# lowlabel.config.PRETRAIN_METHODS names the same keys (config imports no methods; a test checks).
PRETRAIN_METHODS: dict[str, type[SSLMethod]] = {
    method.name: method for method in (SimCLR, MoCo, BYOL, BarlowTwins, VICReg, RotNet)
}

# What the preflight check (run by every training stage, pretrain included) needs to know of
# the semi-supervised methods, without importing them; a test checks it agrees with
# SEMISUP_REGISTRY's ``uses_unlabeled``.
SEMISUP_USES_UNLABELED: dict[str, bool] = {
    "supervised": False,
    "fixmatch": True,
    "uda": True,
    "freematch": True,
    "pseudolabel": True,
    "meanteacher": True,
    "mixmatch": True,
    "flexmatch": True,
}

__all__ = [
    "BYOL",
    "PRETRAIN_METHODS",
    "SEMISUP_USES_UNLABELED",
    "BarlowTwins",
    "MoCo",
    "MomentumSSLMethod",
    "RotNet",
    "SSLMethod",
    "SimCLR",
    "VICReg",
]

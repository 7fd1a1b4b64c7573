"""Training methods: self-supervised (``SSLMethod`` subclasses) and semi-supervised ones
(``SemisupMethod``: a step function and its running statistics, one module each).

This package's ``__init__`` runs whenever any method module is imported, so it holds only the
self-supervised registry: the pretrain stage then never loads semi-supervised code, and DVC
does not re-run pretraining when only that code changes (tests/test_dvc_deps.py). The
semi-supervised registry is ``lowlabel.methods.semisup_registry.SEMISUP_REGISTRY``.
"""

from lowlabel.methods.base import MomentumSSLMethod, SSLMethod
from lowlabel.methods.moco import MoCo
from lowlabel.methods.simclr import SimCLR

PRETRAIN_METHODS: dict[str, type[SSLMethod]] = {SimCLR.name: SimCLR, MoCo.name: MoCo}

# What the preflight check (run by every training stage, pretrain included) needs to know of
# the semi-supervised methods, without importing them; a test checks it agrees with
# SEMISUP_REGISTRY's ``uses_unlabeled``.
SEMISUP_USES_UNLABELED: dict[str, bool] = {"supervised": False, "fixmatch": True, "uda": True, "freematch": True}

__all__ = ["PRETRAIN_METHODS", "SEMISUP_USES_UNLABELED", "MoCo", "MomentumSSLMethod", "SSLMethod", "SimCLR"]

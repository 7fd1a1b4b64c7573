"""Training methods: self-supervised (``SSLMethod`` subclasses) and semi-supervised steps."""

from lowlabel.methods.base import MomentumSSLMethod, SSLMethod
from lowlabel.methods.moco import MoCo
from lowlabel.methods.semisup import SEMISUP_STEPS
from lowlabel.methods.simclr import SimCLR

PRETRAIN_METHODS: dict[str, type[SSLMethod]] = {SimCLR.name: SimCLR, MoCo.name: MoCo}

__all__ = ["PRETRAIN_METHODS", "SEMISUP_STEPS", "MoCo", "MomentumSSLMethod", "SSLMethod", "SimCLR"]

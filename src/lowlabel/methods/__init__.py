"""Training methods: self-supervised (``SSLMethod`` subclasses) and semi-supervised steps."""

from lowlabel.methods.base import SSLMethod
from lowlabel.methods.semisup import SEMISUP_STEPS
from lowlabel.methods.simclr import SimCLR

PRETRAIN_METHODS: dict[str, type[SSLMethod]] = {SimCLR.name: SimCLR}

__all__ = ["PRETRAIN_METHODS", "SEMISUP_STEPS", "SSLMethod", "SimCLR"]

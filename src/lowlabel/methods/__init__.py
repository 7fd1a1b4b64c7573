"""Training methods: self-supervised (``SSLMethod`` subclasses) and semi-supervised ones
(``SemisupMethod``: a step function and its running statistics, one module each)."""

from lowlabel.methods.base import MomentumSSLMethod, SSLMethod
from lowlabel.methods.freematch import FREEMATCH
from lowlabel.methods.moco import MoCo
from lowlabel.methods.semisup import FIXMATCH, SUPERVISED, UDA, SemisupMethod
from lowlabel.methods.simclr import SimCLR

PRETRAIN_METHODS: dict[str, type[SSLMethod]] = {SimCLR.name: SimCLR, MoCo.name: MoCo}
# The names are params.yaml's (config.SEMISUP_METHODS; a test checks they agree).
SEMISUP_REGISTRY: dict[str, SemisupMethod] = {"supervised": SUPERVISED, "fixmatch": FIXMATCH, "uda": UDA, "freematch": FREEMATCH}

__all__ = ["PRETRAIN_METHODS", "SEMISUP_REGISTRY", "MoCo", "MomentumSSLMethod", "SSLMethod", "SemisupMethod", "SimCLR"]

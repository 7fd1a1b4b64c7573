"""The semi-supervised methods (``SemisupMethod``: a step function and its running statistics),
one module each, and their registry by params.yaml name (config.SEMISUP_METHODS; a test checks
they agree). The self-supervised family (``lowlabel.methods.ssl``) never imports this package,
nor this package it, so DVC re-runs no pretraining when only this code changes.

Adding a method: one module here defining a ``SemisupMethod``, one line below, its name (and
whether it needs unlabeled images) in ``config.SEMISUP_USES_UNLABELED``, and its params section.
"""

from lowlabel.methods.semisup.base import SemisupMethod
from lowlabel.methods.semisup.fixmatch import FIXMATCH
from lowlabel.methods.semisup.flexmatch import FLEXMATCH
from lowlabel.methods.semisup.freematch import FREEMATCH
from lowlabel.methods.semisup.mean_teacher import MEAN_TEACHER
from lowlabel.methods.semisup.mixmatch import MIXMATCH
from lowlabel.methods.semisup.pseudo_label import PSEUDO_LABEL
from lowlabel.methods.semisup.supervised import SUPERVISED
from lowlabel.methods.semisup.uda import UDA

SEMISUP_REGISTRY: dict[str, SemisupMethod] = {
    "supervised": SUPERVISED,
    "fixmatch": FIXMATCH,
    "uda": UDA,
    "freematch": FREEMATCH,
    "pseudolabel": PSEUDO_LABEL,
    "meanteacher": MEAN_TEACHER,
    "mixmatch": MIXMATCH,
    "flexmatch": FLEXMATCH,
}

__all__ = ["SEMISUP_REGISTRY", "SemisupMethod"]

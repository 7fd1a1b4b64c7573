"""The semi-supervised methods by their params.yaml name (config.SEMISUP_METHODS; a test checks
they agree). Kept out of ``lowlabel.methods.__init__`` so that pretraining never imports them."""

from lowlabel.methods.flexmatch import FLEXMATCH
from lowlabel.methods.freematch import FREEMATCH
from lowlabel.methods.mean_teacher import MEAN_TEACHER
from lowlabel.methods.mixmatch import MIXMATCH
from lowlabel.methods.pseudo_label import PSEUDO_LABEL
from lowlabel.methods.semisup import FIXMATCH, SUPERVISED, UDA, SemisupMethod

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

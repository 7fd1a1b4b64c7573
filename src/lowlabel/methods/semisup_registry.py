"""The semi-supervised methods by their params.yaml name (config.SEMISUP_METHODS; a test checks
they agree). Kept out of ``lowlabel.methods.__init__`` so that pretraining never imports them."""

from lowlabel.methods.freematch import FREEMATCH
from lowlabel.methods.semisup import FIXMATCH, SUPERVISED, UDA, SemisupMethod

SEMISUP_REGISTRY: dict[str, SemisupMethod] = {"supervised": SUPERVISED, "fixmatch": FIXMATCH, "uda": UDA, "freematch": FREEMATCH}

__all__ = ["SEMISUP_REGISTRY", "SemisupMethod"]

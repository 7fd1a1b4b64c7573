"""lowlabel: unlabeled images + a handful of labels -> a strong image encoder, and the proof."""

__version__ = "0.1.0"

"""One thin entry per DVC stage: ``python -m lowlabel.stages.<name>``."""

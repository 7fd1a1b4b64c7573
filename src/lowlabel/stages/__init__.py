"""One thin entry per DVC stage: ``python -m lowlabel.stages.<name>``."""

from lowlabel.runner.warm import delegate

# Under `./pipeline repro` a process that has imported the stack already runs the stage
# (lowlabel.runner.warm); otherwise, or where it cannot, this returns and the stage runs here.
delegate(__name__)

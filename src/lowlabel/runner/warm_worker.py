"""``python -m lowlabel.runner.warm_worker SCRIPT ARGS``: a Ray worker of the session's local Ray,
forked warm.

Every Ray Train job starts seven worker processes (its controller, the workers, the metrics sink
and Ray Train's helper actors); each imports Ray, most of them torch, the workers timm,
albumentations and kornia too: ~20 s of CPU, ~12 s before a job's first step on 2 cores.
lowlabel.runner.launch.ensure_ray names this module as the workers' interpreter
(``runtime_env["py_executable"]``) when the job runs on the session's own Ray: the worker
(``default_worker.py`` and its arguments) is then forked from the session's server of Ray
workers, which has torch, timm and the augmentation libraries imported (not Ray: each worker
loads it itself, see lowlabel.runner.warm). Where it cannot be (no server, another interpreter,
changed sources), this process becomes the interpreter Ray would have started.
"""

import os
import sys

from lowlabel.runner.warm import delegate_script

delegate_script(sys.argv[1:])
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])

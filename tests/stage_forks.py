"""Run many stage invocations as forks of one process that imported the stack once.

``python tests/stage_forks.py JOBS.json`` imports the stage modules (torch, Ray, MLflow: most
of a stage's seconds when it stops early), then forks one child per job, at most ``parallel``
at a time. Each child is a process of its own and runs its stage as ``python -m`` would: in
the job's cwd, with its argv, stdout and stderr going to the job's files, the module run as
``__main__``, a traceback and exit code 1 for an uncaught exception, the atexit handlers run.
JOBS.json: ``{"parallel": N, "jobs": [{"cwd", "module", "args", "stdout", "stderr"}]}``; the
exit codes are printed as a JSON list, in job order.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import runpy
import sys
import threading
import traceback

from lowlabel.runner.warm import exit_code


def run_child(job: dict) -> int:
    os.chdir(job["cwd"])
    for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.argv = [job["module"], *job["args"]]
    try:
        runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit:
        code = exit_code(exit)
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    for module in {job["module"] for job in spec["jobs"]}:
        importlib.import_module(module)
    # A fork copies only the calling thread: with another thread running, a lock it held
    # would stay held in every child.
    assert threading.active_count() == 1, f"threads before fork: {threading.enumerate()}"
    codes: dict[int, int] = {}
    running: dict[int, int] = {}  # pid -> job index
    pending = list(enumerate(spec["jobs"]))
    while pending or running:
        while pending and len(running) < spec["parallel"]:
            index, job = pending.pop(0)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    code = run_child(job)
                finally:
                    os._exit(code)
            running[pid] = index
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    print(json.dumps([codes[i] for i in range(len(spec["jobs"]))]))


if __name__ == "__main__":
    main()

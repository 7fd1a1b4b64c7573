"""Warm stage processes: each stage of a repro forked from one process that has imported the stack.

A stage is ``python -m lowlabel.stages.<name>``: a new interpreter that imports torch, Ray, Ray
Train and MLflow before its first line of work (~3-4 s on 2 cores, then ~2 s more for the
torch.export that logging the MLflow model needs), nine times in the default pipeline. Under
``lowlabel.runner.session`` one server imports all of it once (:data:`PRELOAD`), then forks a
child per stage; the stage's own process (what DVC started, :func:`delegate`) hands the server
its arguments, working directory, environment and standard streams, relays the signals it gets
and exits as the child exits (code, or the signal that ended it). Nothing else changes: the child
runs the module as ``python -m`` would (``runpy``, as ``__main__``) with the stage's environment,
and starts no Ray of its own (the server never initialises Ray, so forking it is safe).

The stage runs cold, as without a server, whenever the server cannot stand in for a fresh
interpreter: no server, a different interpreter or ``PYTHON*`` variable, interpreter options
before ``-m``, or lowlabel's sources changed since the server imported them. A warm stage ends
as the interpreter would, less the 2-3 s of module teardown (:func:`exit_without_teardown`).

The Ray workers of the session's own Ray are served the same way by a second server
(:data:`WORKER_PRELOAD`: torch, timm, the augmentation libraries; never Ray, whose core library
takes a worker's job id from the environment when it loads): Ray runs
``lowlabel.runner.warm_worker default_worker.py ARGS`` for each (:func:`delegate_script`), and
the child runs the script as ``python`` would, in a process group of its own at the launcher's
priority (Ray stops a worker by its group and starts it at nice 15), with Ray's environment.

This module is imported by every stage entry before anything else: standard library only (and
lowlabel.env, which is too).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from lowlabel.env import verbose

# Set by the session for the command it runs: where the server listens.
SOCKET_ENV = "LOWLABEL_WARM_SOCKET"
# Set by the session too: where the server listens that forks the Ray workers of its local Ray
# (lowlabel.runner.warm_worker; passed on to them by lowlabel.runner.launch.ensure_ray).
WORKER_SOCKET_ENV = "LOWLABEL_WARM_WORKER_SOCKET"
# Set in a warm child: the pid of the stage's own process (the one DVC started and waits for).
STAGE_PID_ENV = "LOWLABEL_STAGE_PID"
# What a stage's driver imports (the stages themselves), what logging its MLflow model and the
# tracking store import on first use, and the training-job launcher.
PRELOAD = (
    "lowlabel.stages.source",
    "lowlabel.stages.prepare",
    "lowlabel.stages.pretrain",
    "lowlabel.stages.semisup",
    "lowlabel.stages.meta",
    "lowlabel.stages.fewshot",
    "lowlabel.stages.report",
    "lowlabel.runner.launch",
    "lowlabel.runner.jobs",
    "lowlabel.models.store",
    "mlflow.pytorch",
    "mlflow.store.tracking.sqlalchemy_store",
    "torch.export._trace",  # what torch.export.export imports on first use (torch._dynamo: ~2 s)
)
# What the session's Ray workers import, less Ray (lowlabel.runner.warm_worker): torch, timm
# (torchvision, torch._dynamo), the augmentation libraries, and what of lowlabel needs no Ray.
WORKER_PRELOAD = (
    "torch",
    "timm",
    "albumentations",
    "kornia",
    "pandas",  # what Ray Train imports that imports no Ray: ~0.25 s of CPU in each process
    "pyarrow.fs",
    "lowlabel.data.augment",
    "lowlabel.data.device_augment",
    "lowlabel.models.encoders",
)
# Signals a stage process passes on to its warm child (what a terminal, DVC or a scheduler sends).
RELAYED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
# A stage process that dies without a word (SIGKILL): its child gets SIGTERM, then this long to unwind.
ORPHAN_GRACE_S = 30.0


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")


class _Lines:
    """Newline-delimited JSON messages from a stream socket (the first may carry file descriptors)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buffer, self.fds = sock, b"", []

    def read(self) -> dict[str, Any] | None:
        while b"\n" not in self.buffer:
            data, fds, _, _ = socket.recv_fds(self.sock, 1 << 20, 3)
            self.fds += fds
            if not data:
                return None
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)


# --- the stage's side --------------------------------------------------------------------


def delegate(package: str) -> None:
    """Run this ``python -m <package>.<stage>`` process's stage in a warm child when a server is
    up for it; returns (and the stage runs here, cold) when none can. Never returns otherwise:
    this process exits as the child did."""
    path = os.environ.get(SOCKET_ENV)
    argv = getattr(sys, "orig_argv", [])
    if not path or len(argv) < 3 or argv[1] != "-m" or not argv[2].startswith(package + "."):
        return
    _hand_over(path, {"module": argv[2], "args": argv[3:]}, argv[2])


def delegate_script(argv: list[str]) -> None:
    """Run ``python SCRIPT ARGS`` (``argv``: a Ray worker's command line, lowlabel.runner.warm_worker)
    in a warm child when a server is up for it; returns when none can (then this process execs
    the interpreter itself). Never returns otherwise."""
    path = os.environ.get(WORKER_SOCKET_ENV)
    if not path or not argv or argv[0].startswith("-"):  # interpreter options: not ours to stand in for
        return
    _hand_over(path, {"script": os.path.abspath(argv[0]), "args": argv[1:]}, os.path.basename(argv[0]))


def _hand_over(path: str, what: dict[str, Any], label: str) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        request = {**what, "cwd": os.getcwd(), "env": dict(os.environ), "executable": sys.executable, "prefix": sys.prefix, "pid": os.getpid(),
                   "nice": os.getpriority(os.PRIO_PROCESS, 0)}
        socket.send_fds(sock, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
        lines = _Lines(sock)
        reply = lines.read()
    except OSError:
        reply = None
    if not reply or "pid" not in reply:
        sock.close()
        if reply and verbose():
            print(f"[warm] running {label} cold: {reply.get('refused')}", file=sys.stderr, flush=True)
        return
    for signum in RELAYED:
        signal.signal(signum, lambda signum, frame: _relay(sock, signum))
    try:
        outcome = lines.read()
    except OSError:
        outcome = None
    if outcome is None:
        print(f"error: the warm-stage server stopped while {label} ran (pid {reply['pid']})", file=sys.stderr, flush=True)
        os._exit(1)
    if "signal" in outcome:
        signum = int(outcome["signal"])
        if signum not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        os._exit(128 + signum)
    os._exit(int(outcome["exit"]))


def _relay(sock: socket.socket, signum: int) -> None:
    try:
        _send(sock, {"signal": signum})
    except OSError:
        pass


def stage_pid() -> int:
    """The pid of this stage's process as DVC sees it: this process, or the one a warm child
    runs for (whose parent is the server, not DVC: what walks up to DVC starts there)."""
    return int(os.environ.get(STAGE_PID_ENV) or os.getpid())


# --- the server's side -------------------------------------------------------------------


class _Child:
    def __init__(self, pid: int, conn: socket.socket, lines: _Lines) -> None:
        self.pid, self.conn, self.lines = pid, conn, lines
        self.pidfd = os.pidfd_open(pid)
        self.kill_at: float | None = None  # set when its stage process is gone


class Server:
    def __init__(self, path: str) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        # Listening before the imports: a stage that starts meanwhile waits for them, it does not run cold.
        self.listener.listen(16)
        self.env = dict(os.environ)
        # The code being worked on: lowlabel and the PYTHONPATH folders (installed packages do
        # not change mid-repro). Modification times of the modules imported from there.
        self.roots = [Path(__file__).resolve().parents[1]]
        self.roots += [Path(p).resolve() for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        self.stamps: dict[str, int] = {}
        self.stamped: set[str] = set()  # modules already looked at
        self.before: dict[str, str] = {}
        self.import_env: dict[str, str] = {}
        self.children: dict[int, _Child] = {}  # by pid

    def preload(self, name: str) -> None:
        """Import one more module (called between requests: a stage that comes meanwhile is forked
        with what is imported so far and imports the rest itself)."""
        import importlib

        from lowlabel.env import configure_quiet_env

        if not self.before:
            self.before = dict(os.environ)
            configure_quiet_env()
        try:
            importlib.import_module(name)
        except Exception as error:  # the stage that needs it reports it, cold
            print(f"[warm] not preloaded: {name}: {error}", file=sys.stderr, flush=True)
        self.stamp_sources()
        # What importing set in the environment (lowlabel.stages.common's quiet defaults) a cold
        # stage would set for itself: a child gets it too, where its own environment has none.
        self.import_env = {k: v for k, v in os.environ.items() if self.before.get(k) != v}

    def stamp_sources(self) -> None:
        """Record the modification time of each module imported since the last call from the
        roots (each module is looked at once: there are ~5,000 after the preload)."""
        for name, module in list(sys.modules.items()):
            if name in self.stamped:
                continue
            self.stamped.add(name)
            file = getattr(module, "__file__", None)
            if file and any(Path(file).resolve().is_relative_to(root) for root in self.roots):
                self.stamps[file] = _mtime(file)

    def refusal(self, request: dict[str, Any]) -> str | None:
        """Why the child would not be what a fresh interpreter would be, or None."""
        if "script" in request and "ray._raylet" in sys.modules:
            # Ray's core library reads the worker's job id from the environment when it loads:
            # a worker must load it itself (the server of Ray workers never imports Ray).
            return "Ray is imported in this server"
        if (os.path.realpath(request["executable"]), request["prefix"]) != (os.path.realpath(sys.executable), sys.prefix):
            return f"another interpreter or environment ({request['executable']}, {request['prefix']})"
        startup = {k for k in {**self.env, **request["env"]} if k.startswith("PYTHON")}
        changed = sorted(k for k in startup if self.env.get(k) != request["env"].get(k))
        if "script" in request and "PYTHONPATH" in changed and _on_path(request["env"].get("PYTHONPATH", "")):
            # A Ray worker's PYTHONPATH names lowlabel's sources for other nodes (ensure_ray):
            # here they are on the path already.
            changed.remove("PYTHONPATH")
        if changed:
            return f"interpreter variables differ: {', '.join(changed)}"
        stale = [f for f, stamp in self.stamps.items() if _mtime(f) != stamp]
        if stale:
            return f"sources changed since the server started ({stale[0]})"
        return None

    def serve(self, preload: tuple[str, ...] = PRELOAD) -> dict[str, Any]:
        """Import ``preload`` one module at a time, serving requests in between (the first
        stages need the least: source and prepare come first), then serve until SIGTERM (then
        exit); returns only in a forked child, with its request."""
        import selectors
        import time

        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        pending = list(preload)
        while True:
            deadlines = [c.kill_at for c in self.children.values() if c.kill_at is not None]
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            for key, _ in self.selector.select(0 if pending else timeout):
                if key.fileobj is self.listener:
                    conn, _ = self.listener.accept()
                    job = self.start(conn)
                    if job is not None:
                        return job
                elif key.data[0] == "stage":
                    self.relay(key.data[1])
                else:
                    self.reap(key.data[1])
            for child in list(self.children.values()):
                if child.kill_at is not None and time.monotonic() >= child.kill_at:
                    _kill(child.pid, signal.SIGKILL)
                    child.kill_at = None
            if pending:
                self.preload(pending.pop(0))
                if not pending and verbose():
                    print(f"[warm] ready: {len(preload)} modules imported", file=sys.stderr, flush=True)

    def start(self, conn: socket.socket) -> dict[str, Any] | None:
        conn.settimeout(10)
        lines = _Lines(conn)
        try:
            request = lines.read()
        except (OSError, ValueError):
            request = None
        refused = "no request" if request is None or len(lines.fds) != 3 else self.refusal(request)
        if refused:
            if request is not None:
                try:
                    _send(conn, {"refused": refused})
                except OSError:
                    pass
            conn.close()
            for fd in lines.fds:
                os.close(fd)
            return None
        pid = os.fork()
        if pid == 0:  # the child: nothing of the server's stays open, no handler of its own
            for signum in RELAYED:
                signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
            self.selector.close()
            self.listener.close()
            for child in self.children.values():
                os.close(child.pidfd)
                child.conn.close()
            self.children = {}
            conn.close()
            for target, fd in enumerate(lines.fds):
                os.dup2(fd, target)
                os.close(fd)
            if "script" in request:  # a Ray worker: its environment as Ray made it
                return request
            return {**request, "env": {**self.import_env, **request["env"]}}
        for fd in lines.fds:
            os.close(fd)
        child = self.children[pid] = _Child(pid, conn, lines)
        conn.settimeout(None)
        self.selector.register(conn, 1, data=("stage", child))
        self.selector.register(child.pidfd, 1, data=("child", child))
        _send(conn, {"pid": pid})
        return None

    def relay(self, child: _Child) -> None:
        """A signal from a stage process for its child; or its end (killed): the child is stopped."""
        try:
            message = child.lines.read()
        except (OSError, ValueError):
            message = None
        if message is not None:
            _kill(child.pid, int(message["signal"]))
            return
        import time

        self.selector.unregister(child.conn)
        child.conn.close()
        _kill(child.pid, signal.SIGTERM)
        child.kill_at = time.monotonic() + ORPHAN_GRACE_S

    def reap(self, child: _Child) -> None:
        del self.children[child.pid]
        self.selector.unregister(child.pidfd)
        os.close(child.pidfd)
        _, status = os.waitpid(child.pid, 0)
        if child.conn.fileno() < 0:  # its stage process is gone
            return
        outcome = {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else {"exit": os.waitstatus_to_exitcode(status)}
        try:
            _send(child.conn, outcome)
        except OSError:
            pass
        self.selector.unregister(child.conn)
        child.conn.close()

    def stop(self, signum: int = signal.SIGTERM) -> None:
        for pid in self.children:
            _kill(pid, signum)
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _on_path(pythonpath: str) -> bool:
    """Whether every folder of ``pythonpath`` is on this interpreter's sys.path already."""
    here = {os.path.realpath(p) for p in sys.path if p}
    return all(os.path.realpath(p) in here for p in pythonpath.split(os.pathsep) if p)


def _mtime(file: str) -> int:
    try:
        return os.stat(file).st_mtime_ns
    except OSError:
        return -1


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def run_child(request: dict[str, Any]) -> None:
    """In the forked child: become ``python -m <module> <args>`` (a stage) or ``python <script>
    <args>`` (a Ray worker) in the requester's cwd and environment."""
    import runpy

    os.chdir(request["cwd"])
    # The requester's scheduling priority: Ray starts its workers at nice 15 (worker_niceness),
    # below its own daemons and the drivers; a child would otherwise have the server's.
    try:
        os.setpriority(os.PRIO_PROCESS, 0, request["nice"])
    except OSError:  # a lower value than the server's needs privileges: keep the server's
        pass
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ.pop(SOCKET_ENV, None)  # a stage's own subprocesses start cold
    # A fresh interpreter seeds these from the OS; forked children would all share the server's.
    import random

    import numpy as np

    random.seed()
    np.random.seed()
    if "script" in request:
        # A process group of its own, as the process Ray started has: Ray stops a worker and what
        # it started by its group, which would otherwise be the server's (and every worker's).
        os.setpgid(0, 0)
        sys.path[0] = os.path.dirname(request["script"])  # what `python SCRIPT` puts first
        sys.argv = [request["script"], *request["args"]]
        if verbose():
            print(f"[warm] {os.path.basename(request['script'])}: forked from the warm-stage server (pid {os.getppid()})", file=sys.stderr, flush=True)
        runpy.run_path(request["script"], run_name="__main__")
        return
    os.environ[STAGE_PID_ENV] = str(request["pid"])
    sys.path[0] = request["cwd"]  # what -m puts first
    sys.argv = [request["module"], *request["args"]]
    # As under -m: the module runs as __main__ only (the server imported it by name too).
    sys.modules.pop(request["module"], None)
    if verbose():
        print(f"[warm] {request['module']}: forked from the warm-stage server (pid {os.getppid()})", file=sys.stderr, flush=True)
    _exit_after(lambda: runpy.run_module(request["module"], run_name="__main__", alter_sys=True))


def _exit_after(run: Callable[[], object]) -> NoReturn:
    """Run a stage, then end this process as the interpreter would, less its teardown
    (:func:`exit_without_teardown`). An uncaught exception ends it the usual way."""
    try:
        run()
        code = 0
    except SystemExit as exit:
        code = exit_code(exit)
    exit_without_teardown(code)


def exit_code(exit: SystemExit) -> int:
    """The status the interpreter ends with for an uncaught ``exit`` (a message: printed, 1)."""
    if exit.code is None or isinstance(exit.code, int):
        return exit.code or 0
    print(exit.code, file=sys.stderr)
    return 1


def exit_without_teardown(code: int) -> NoReturn:
    """End this process as the interpreter would (non-daemon threads joined, atexit handlers run,
    streams flushed) without tearing down its modules: 1-3 s for a process with torch, Ray and
    MLflow loaded, all of it freeing memory the exit frees anyway."""
    import atexit
    import threading

    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def main() -> None:
    """``python -m lowlabel.runner.warm SOCKET [MODULE ...]``: import MODULEs (default
    :data:`PRELOAD`), then serve until SIGTERM."""
    server = Server(sys.argv[1])

    def stop(signum: int, frame: Any) -> None:
        server.stop(signum)
        exit_without_teardown(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # its own session: Ctrl-C reaches stages through their process
    job = server.serve(tuple(sys.argv[2:]) or PRELOAD)
    run_child(job)


if __name__ == "__main__":
    main()

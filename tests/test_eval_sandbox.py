"""The code sandbox against programs that try to escape it (issue 16), and its refusal to run
without one. Each escape test checks the outcome on the host: the evaluator and its other
processes live, no process of the program remains (found by a marker in argv or environment),
the loopback listener received nothing, nothing was written, the secret was not read."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Iterator, List

import pytest

from fedmerge_plugins.evaluation import sandbox
from fedmerge_plugins.evaluation.code_runner import run_program


@pytest.fixture(autouse=True)
def fresh_probe(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test sees a fresh probe and must get the sandbox (the escapes below, run without
    one, would reach the machine: as root, a stray kill could end every process on it)."""
    monkeypatch.delenv(sandbox.ALLOW_ENV, raising=False)
    sandbox.isolation.cache_clear()
    sandbox.require_isolation.cache_clear()
    yield
    sandbox.isolation.cache_clear()
    sandbox.require_isolation.cache_clear()


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The runner's temporary folders go here, so a test can see what it leaves behind."""
    folder = tmp_path / "runner-tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _processes_with(marker: str) -> List[int]:
    """Live (non-zombie) processes whose argv or environment holds ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            text = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in text and state != "Z":
            found.append(int(entry.name))
    return found


def _sleeper(marker: str) -> str:
    """Python source of the argv of a process that sleeps with ``marker`` in its argv."""
    return f"[sys.executable, '-c', 'import time; time.sleep(600)', {marker!r}]"


@pytest.fixture
def marker() -> Iterator[str]:
    tag = f"fedmerge-escape-{uuid.uuid4().hex}"
    yield tag
    for pid in _processes_with(tag):  # never leave one behind, even when the test fails
        os.kill(pid, 9)


def test_the_sandbox_is_in_force_and_described(capsys):
    level = sandbox.require_isolation()
    assert level.sandboxed and level.missing == ()
    assert level.describe().startswith("code sandbox: bubblewrap (PID, network")
    assert sandbox.require_isolation() is level  # probed once per process
    assert capsys.readouterr().err == ""  # library code prints nothing: the command says it


def test_signals_cannot_reach_the_evaluator_or_its_other_processes(private_tmp, marker):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", marker])
    try:
        program = (
            "import os, posix\n"
            "visible = sorted(int(name) for name in os.listdir('/proc') if name.isdigit())\n"
            "assert visible == [1, 2], visible\n"  # bwrap's init and the program: nothing else to signal
            "for pid in (os.getppid(), {evaluator}, {bystander}):\n"
            "    try:\n"
            "        posix.kill(pid, 9)\n"
            "    except OSError as error:\n"
            "        print(pid, error)\n"
            "os.killpg(0, 9)\n"
        ).format(evaluator=os.getpid(), bystander=bystander.pid)
        result = run_program(program)
        assert result.status == "killed" and result.detail == "killed by SIGKILL"  # it could kill itself only
        assert bystander.poll() is None  # the evaluator (this test) and its other processes live
        assert list(private_tmp.iterdir()) == []  # the run's temporary folder is gone
    finally:
        bystander.kill()
        bystander.wait()
    assert _processes_with(marker) == []


@pytest.mark.parametrize(
    "detach",
    [
        "os.posix_spawn(sys.executable, {argv}, {{}}, setsid=True)",
        "if os.fork() == 0:\n    os.setsid()\n    os.execv(sys.executable, {argv})",
        # double fork: the grandchild's parent exits, so it is re-parented away from the program
        "if os.fork() == 0:\n    if os.fork() == 0:\n        os.setsid()\n        os.execv(sys.executable, {argv})\n"
        "    os._exit(0)\nos.wait()",
        "subprocess.Popen({argv}, start_new_session=True, env={{'TAG': {marker!r}}})",
    ],
    ids=["posix_spawn-setsid", "fork-setsid", "double-fork", "popen-new-session"],
)
def test_no_detached_process_outlives_the_run(detach, marker):
    program = (
        "import os, subprocess, sys, time\n"
        + detach.format(argv=_sleeper(marker), marker=marker)
        + "\ntime.sleep(0.2)\n"
        + "assert os.system('true') == 0\n"
    )
    result = run_program(program)
    assert result.status == "passed", result.detail  # ended at once, not at the time-out
    assert _processes_with(marker) == []


@pytest.mark.parametrize("end", ["os._exit(0)", "while True:\n    pass"], ids=["os._exit", "time-out"])
def test_a_program_that_ends_abruptly_leaves_nothing(end, marker):
    program = f"import os, sys\nos.posix_spawn(sys.executable, {_sleeper(marker)}, {{}}, setsid=True)\n{end}\n"
    result = run_program(program, timeout_s=2)
    assert result.status == ("passed" if end.startswith("os.") else "timeout")
    assert _processes_with(marker) == []


FORKS = (
    "import os, time\n"
    "for _ in range(50):\n"
    "    if os.fork() == 0:\n"
    "        time.sleep(30)\n"
    "        os._exit(0)\n"
)


def test_process_count_is_limited(marker):
    tagged = "import sys\n" + FORKS.replace("time.sleep(30)", f"os.execv(sys.executable, {_sleeper(marker)})")
    result = run_program(tagged)
    assert result.status == "failed" and "BlockingIOError" in result.detail
    assert _processes_with(marker) == []
    assert run_program(FORKS, max_processes=64).passed  # the limit is what stopped it


def test_no_network_not_even_the_hosts_loopback():
    received: List[bytes] = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.2)
        port = listener.getsockname()[1]

        def serve() -> None:
            for _ in range(20):
                try:
                    connection, _ = listener.accept()
                except OSError:
                    continue
                with connection:
                    received.append(connection.recv(100))

        thread = threading.Thread(target=serve)
        thread.start()
        program = (
            "import socket\n"
            f"socket.create_connection(('127.0.0.1', {port}), timeout=5).sendall(b'leak')\n"
        )
        result = run_program(program)
        # the same client outside the sandbox does get through: the listener works
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        thread.join()
    assert result.status == "failed" and "ConnectionRefusedError" in result.detail
    assert received == [b""]


def _writable_places(tmp_path: Path) -> List[Path]:
    """Folders the evaluator can write to, some also world-writable on the host."""
    places = [tmp_path, Path(tempfile.gettempdir())]
    open_folder = tmp_path / "open"
    open_folder.mkdir()
    open_folder.chmod(0o777)
    places.append(open_folder)
    for shared in ("/var/tmp", "/dev/shm", str(Path.cwd())):
        if os.access(shared, os.W_OK):
            places.append(Path(shared))
    return places


def test_writes_stay_in_the_scratch_folder(tmp_path, private_tmp):
    name = f"fedmerge-escape-{uuid.uuid4().hex}"
    targets = [place / name for place in _writable_places(tmp_path)] + [Path("..") / name, Path("/") / name]
    program = (
        "import os, sys\n"
        f"written = []\n"
        f"for path in {[str(target) for target in targets]!r}:\n"
        "    try:\n"
        "        with open(path, 'w') as handle:\n"
        "            handle.write('x')\n"
        "        written.append(path)\n"
        "    except OSError:\n"
        "        pass\n"
        f"open({name!r}, 'w').write('in scratch')\n"
        "assert open(" + repr(name) + ").read() == 'in scratch'\n"
        "sys.exit(f'written: {written}' if written else 0)\n"
    )
    result = run_program(program)
    assert result.passed, result.detail
    leftovers = [target for target in targets if target.exists()] + [p for p in Path("/tmp").iterdir() if p.name == name]
    assert leftovers == []
    assert list(private_tmp.iterdir()) == []  # the scratch folder itself is removed


@pytest.mark.skipif(os.geteuid() != 0, reason="as another user the sandbox keeps the caller's uid and files")
def test_files_unreadable_to_others_stay_unreadable():
    base = Path("/var/tmp") if os.access("/var/tmp", os.W_OK) else Path.cwd()
    folder = Path(tempfile.mkdtemp(prefix="fedmerge-secret-", dir=base))
    try:
        folder.chmod(0o755)
        secret, public = folder / "secret", folder / "public"
        secret.write_text("s3cret")
        secret.chmod(0o600)
        public.write_text("open")
        public.chmod(0o644)
        program = (
            f"assert open({str(public)!r}).read() == 'open'\n"  # the folder is visible...
            f"print(open({str(secret)!r}).read())\n"  # ...the secret is not readable
        )
        result = run_program(program)
        assert result.status == "failed" and "PermissionError" in result.detail
        folder_uid = folder.stat().st_uid
        assert folder_uid == 0 and secret.read_text() == "s3cret"
    finally:
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()


def test_refuses_without_a_sandbox_unless_allowed(monkeypatch, capsys):
    monkeypatch.setenv("PATH", "/nonexistent")  # no bwrap on PATH
    monkeypatch.delenv(sandbox.ALLOW_ENV, raising=False)
    with pytest.raises(sandbox.SandboxUnavailable) as refused:
        run_program("pass")
    message = str(refused.value)
    assert "\n" not in message and "bwrap not found" in message and sandbox.ALLOW_ENV in message
    assert all(missing in message for missing in sandbox.PROPERTIES)
    sandbox.require_isolation.cache_clear()
    monkeypatch.setenv(sandbox.ALLOW_ENV, "1")
    assert run_program("import os\nassert os.getpid() != 2\n").passed  # runs, unsandboxed
    assert sandbox.require_isolation().describe().startswith("code sandbox: NONE (bwrap not found")
    assert capsys.readouterr().err == ""


def test_python_installation_under_root_only_folders_is_bound_back():
    base = Path(tempfile.mkdtemp(dir="/tmp"))  # /tmp and base: others may enter
    try:
        base.chmod(0o755)
        hidden = base / "home"
        prefix = hidden / "pyenv" / "versions" / "3.11"
        (prefix / "lib").mkdir(parents=True)
        hidden.chmod(0o700)
        arguments = sandbox._reachable([str(prefix), str(prefix / "lib"), "/usr"])
        assert arguments == [
            "--perms", "0755", "--tmpfs", str(hidden),
            "--perms", "0755", "--dir", str(hidden / "pyenv"),
            "--perms", "0755", "--dir", str(hidden / "pyenv" / "versions"),
            "--ro-bind", str(prefix), str(prefix),
        ]  # fmt: skip
    finally:
        shutil.rmtree(base)


@pytest.mark.parametrize("inside", ["", "clone/.venv"], ids=["/tmp/venv", "/tmp/checkout/clone/.venv"])
def test_a_python_installed_under_tmp_runs_programs(inside: str) -> None:
    """A checkout cloned into /tmp has its .venv there, which the sandbox's own /tmp would
    hide (bwrap: "setpriv: failed to execute .../python"): it is bound back, read-only, and
    reachable by the sandbox's uid through the folders above it (bwrap makes them 0700)."""
    top = Path(tempfile.mkdtemp(dir="/tmp", prefix="fedmerge-venv-"))
    venv = top / inside
    try:
        top.chmod(0o755)  # as a clone's folder is
        venv.mkdir(parents=True, exist_ok=True)  # 0755 under the usual umask
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        site = next(venv.glob("lib/python*/site-packages"))
        (site / "fedmerge-test.pth").write_text("\n".join(sys.path[1:]) + "\n")  # this venv's packages
        programs = [f"import sys; assert sys.prefix == {str(venv)!r}", f"open({str(venv / 'written')!r}, 'w')"]
        script = "from fedmerge_plugins.evaluation.code_runner import run_program\n" + "".join(
            f"print(run_program({program!r}).status)\n" for program in programs
        )
        env = {k: v for k, v in os.environ.items() if k != sandbox.ALLOW_ENV}
        done = subprocess.run([str(venv / "bin" / "python"), "-c", script], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split() == ["passed", "failed"]  # runs there, cannot write there
        assert not (venv / "written").exists()
    finally:
        shutil.rmtree(top, ignore_errors=True)

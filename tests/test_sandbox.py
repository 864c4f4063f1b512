"""flarectl.evaluation.sandbox: isolation, limits and containment of untrusted programs (CPU, ~30 s)."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flarectl.evaluation.sandbox import ExecutionResult, live_session_members, run_many, run_program

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux /proc")


def run(source: str, **kwargs) -> ExecutionResult:
    return run_program(textwrap.dedent(source), **kwargs)


def is_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


# -- basics ------------------------------------------------------------------------------------------------------


def test_completed_program_passes_and_output_is_captured() -> None:
    result = run("import sys\nprint('out')\nprint('err', file=sys.stderr)")
    assert result.status == "passed" and result.passed
    assert (result.returncode, result.stdout, result.stderr) == (0, "out\n", "err\n")
    assert 0 < result.seconds < 10


def test_exception_is_failed_with_traceback() -> None:
    result = run("def f():\n    assert 1 == 2, 'boom'\nf()")
    assert result.status == "failed" and result.returncode == 1
    assert "AssertionError: boom" in result.stderr


def test_syntax_error_is_failed() -> None:
    assert run("def f(:\n").status == "failed"


@pytest.mark.parametrize(
    "source",
    ["import sys\nsys.exit(0)", "exit(0)", "raise SystemExit", "import os\nos._exit(0)"],
    ids=["sys.exit", "exit", "SystemExit", "os._exit"],
)
def test_exiting_early_is_not_a_pass(source: str) -> None:
    """Like the official harness, leaving before the checks ran is a failure, whatever the exit code."""
    assert run(source).status == "failed"


def test_from_future_import_works_at_top_of_sample() -> None:
    assert run("from __future__ import annotations\ndef f(x: Undefined) -> None: ...\nf(1)").passed


def test_program_runs_as_main_in_private_scrubbed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", "/should/not/leak")
    monkeypatch.setenv("FLARECTL_TEST_SECRET", "s3cret")
    result = run(
        """
        import os, sys
        assert __name__ == "__main__"
        assert sys.flags.isolated
        assert "PYTHONPATH" not in os.environ and "FLARECTL_TEST_SECRET" not in os.environ
        assert os.environ["HOME"] == os.getcwd() == os.environ["TMPDIR"]
        assert os.listdir(".") == []
        assert sys.stdin.read() == ""
        print(os.getcwd(), os.getpid(), os.getsid(0))
        """
    )
    assert result.passed, result.stderr
    workdir, pid, session = result.stdout.split()
    assert pid == session, "the sample must lead its own session"
    assert not Path(workdir).exists(), "the temporary working directory must be removed"


def test_output_tails_are_bounded() -> None:
    result = run("print('x' * 100_000)\nprint('END')", output_tail_bytes=1000)
    assert result.passed
    assert result.stdout.endswith("END\n") and len(result.stdout) < 1100 and "bytes cut" in result.stdout


def test_kernel_limits_are_applied_and_cannot_be_raised() -> None:
    result = run(
        """
        import resource
        print(resource.getrlimit(resource.RLIMIT_AS)[0], resource.getrlimit(resource.RLIMIT_CPU)[0],
              resource.getrlimit(resource.RLIMIT_FSIZE)[0], resource.getrlimit(resource.RLIMIT_CORE)[0])
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        """,
        memory_mb=300,
        timeout_s=4.5,
        max_file_mb=2,
    )
    assert result.status == "failed" and "PermissionError" in result.stderr
    assert [int(value) for value in result.stdout.split()] == [300 * 2**20, 6, 2 * 2**20, 0]


def test_run_many_keeps_input_order() -> None:
    sources = [f"import time\ntime.sleep({0.05 * (5 - i)})\nprint({i})" for i in range(6)]
    results = run_many(sources, workers=3)
    assert [result.stdout for result in results] == [f"{i}\n" for i in range(6)]
    assert run_many([], workers=3) == []


@pytest.mark.parametrize(
    "kwargs",
    [{"timeout_s": 0}, {"memory_mb": 1}, {"max_processes": 0}, {"max_file_mb": 0}, {"output_tail_bytes": -1}],
)
def test_invalid_limits_are_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        run_program("pass", **kwargs)


# -- time --------------------------------------------------------------------------------------------------------


def test_infinite_loop_is_killed_at_timeout_with_its_whole_session() -> None:
    timeout_s = 1.5
    started = time.monotonic()
    result = run(
        """
        import os, time
        child = os.fork()
        if child == 0:
            time.sleep(120)
            os._exit(0)
        print(os.getsid(0), child, flush=True)
        while True:
            pass
        """,
        timeout_s=timeout_s,
    )
    elapsed = time.monotonic() - started
    assert result.status == "timeout" and result.returncode == -signal.SIGKILL
    assert timeout_s <= result.seconds < timeout_s + 1.5 and elapsed < timeout_s + 2.0
    session, child = map(int, result.stdout.split())
    assert live_session_members(session) == []
    assert not is_alive(child), "the forked grandchild must be killed too"


def test_sleeping_program_times_out() -> None:
    result = run("import time\ntime.sleep(60)", timeout_s=1.0)
    assert result.status == "timeout" and result.seconds < 3.0


# -- filesystem --------------------------------------------------------------------------------------------------

OUTSIDE_WRITES = {
    "open": "open({target!r}, 'w').write('x')",
    "open-append": "open({target!r}, 'a').write('x')",
    "pathlib": "import pathlib\npathlib.Path({target!r}).write_text('x')",
    "os.open": "import os\nos.open({target!r}, os.O_WRONLY | os.O_CREAT)",
    "posix.open": "import posix\nposix.open({target!r}, posix.O_WRONLY | posix.O_CREAT)",
    "mkdir": "import os\nos.makedirs({target!r})",
    "tempfile-dir": "import tempfile\ntempfile.mkstemp(dir={outside!r})",
    "relative-escape": "import os\nopen(os.path.relpath({target!r}), 'w')",
    "chdir-escape": "import os\nos.chdir({outside!r})\nopen('escaped.txt', 'w')",
    "symlink-escape": "import os\nos.symlink({outside!r}, 'link')\nopen('link/escaped.txt', 'w')",
    "rename-out": "import os\nopen('inside.txt', 'w').close()\nos.rename('inside.txt', {target!r})",
    "shutil-copy": "import shutil\nopen('inside.txt', 'w').close()\nshutil.copy('inside.txt', {target!r})",
}

OUTSIDE_CHANGES = {
    "remove": "import os\nos.remove({victim!r})",
    "unlink-dir_fd": "import os\nfd = os.open({outside!r}, os.O_RDONLY)\nos.unlink('victim.txt', dir_fd=fd)",
    "rmtree": "import shutil\nshutil.rmtree({outside!r})",
    "rename-in": "import os\nos.rename({victim!r}, 'stolen.txt')",
    "chmod": "import os\nos.chmod({victim!r}, 0o777)",
    "hardlink": "import os\nos.link({victim!r}, 'hard')\nopen('hard', 'w').write('overwritten')",
    "truncate": "import os\nos.truncate({victim!r}, 0)",
    "overwrite": "open({victim!r}, 'r+').write('overwritten')",
}


@pytest.mark.parametrize("template", OUTSIDE_WRITES.values(), ids=OUTSIDE_WRITES.keys())
def test_writes_outside_the_working_directory_are_refused(template: str, tmp_path: Path) -> None:
    target = tmp_path / "escaped.txt"
    result = run(template.format(target=str(target), outside=str(tmp_path)))
    assert result.status == "failed" and "PermissionError" in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("template", OUTSIDE_CHANGES.values(), ids=OUTSIDE_CHANGES.keys())
def test_existing_files_outside_cannot_be_changed(template: str, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    victim.chmod(0o644)
    result = run(template.format(victim=str(victim), outside=str(tmp_path)))
    assert result.status == "failed" and "PermissionError" in result.stderr, result.stderr
    assert [path.name for path in tmp_path.iterdir()] == ["victim.txt"]
    assert victim.read_text() == "original" and victim.stat().st_mode & 0o777 == 0o644


def test_writes_inside_the_working_directory_are_allowed() -> None:
    result = run(
        """
        import os, pathlib, shutil, tempfile
        os.makedirs("a/b")
        pathlib.Path("a/b/c.txt").write_text("data")
        os.rename("a/b/c.txt", "a/d.txt")
        os.chmod("a/d.txt", 0o600)
        fd, name = tempfile.mkstemp()
        os.close(fd)
        os.unlink(name)
        with open(os.devnull, "w") as sink:
            sink.write("discarded")
        with open(os.path.expanduser("~/cache.txt"), "w") as cache:
            cache.write("home is the working directory")
        shutil.rmtree("a")
        print(sorted(os.listdir(".")))
        """
    )
    assert result.passed, result.stderr
    assert result.stdout == "['cache.txt']\n"


def test_file_size_is_capped() -> None:
    result = run("open('big.bin', 'wb').write(b'x' * (3 * 1024 * 1024))", max_file_mb=1)
    assert result.status == "failed" and "File too large" in result.stderr


# -- network -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)",
        "import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))",
        "import _socket\n_socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)",
        "import socket\nsocket.socket(socket.AF_INET6, socket.SOCK_DGRAM)",
        "import socket\nsocket.getaddrinfo('localhost', {port})",
        "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)",
    ],
    ids=["create_connection", "socket.connect", "_socket", "udp6", "getaddrinfo", "urllib"],
)
def test_network_access_is_refused(template: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        result = run(template.format(port=port))
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert result.status == "failed" and "PermissionError" in result.stderr, result.stderr


def test_local_socketpair_still_works() -> None:
    result = run("import socket\na, b = socket.socketpair()\na.sendall(b'hi')\nprint(b.recv(2))")
    assert result.passed and result.stdout == "b'hi'\n"


# -- memory ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    ["x = bytearray(2 * 1024 ** 3)", "chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024 * 1024))"],
    ids=["one-big-block", "growing"],
)
def test_memory_cap_gives_oom(source: str) -> None:
    result = run(source, memory_mb=256, timeout_s=20)
    assert result.status == "oom" and "MemoryError" in result.stderr
    assert result.seconds < 10


# -- processes ---------------------------------------------------------------------------------------------------

FORK_64 = """
import os
children, refused = [], 0
for _ in range(64):
    try:
        pid = os.fork()
    except BlockingIOError:
        refused += 1
        continue
    if pid == 0:
        os._exit(0)
    children.append(pid)
for pid in children:
    os.waitpid(pid, 0)
print(len(children), refused)
"""

POPEN_64 = """
import subprocess
children, refused = [], 0
for _ in range(64):
    try:
        children.append(subprocess.Popen(["sleep", "5"]))
    except BlockingIOError:
        refused += 1
for child in children:
    child.kill()
    child.wait()
print(len(children), refused)
"""


def test_fork_is_refused_beyond_the_process_cap() -> None:
    """Exited-but-unreaped children still count, as with the kernel's RLIMIT_NPROC; the sample itself is one."""
    result = run(FORK_64, max_processes=8)
    assert result.passed, result.stderr
    assert result.stdout.split() == ["7", "57"]


def test_subprocesses_are_refused_beyond_the_process_cap_when_exec_is_allowed() -> None:
    result = run(POPEN_64, max_processes=8, allow_exec=True, timeout_s=20)
    assert result.passed, result.stderr
    assert result.stdout.split() == ["7", "57"]
    assert result.seconds < 5, "children must have been refused, not waited for"


@pytest.mark.parametrize(
    "source",
    [
        "import subprocess\nsubprocess.run(['true'])",
        "import os\nos.system('true')",
        "import os\nos.popen('true').read()",
        "import os\nos.execv('/bin/true', ['true'])",
        "import os\nos.posix_spawn('/bin/true', ['true'], {})",
    ],
    ids=["subprocess", "os.system", "os.popen", "os.execv", "posix_spawn"],
)
def test_running_other_programs_is_refused_by_default(source: str) -> None:
    result = run(source)
    assert result.status == "failed" and "allow_exec=False" in result.stderr, result.stderr


@pytest.mark.parametrize(
    "source",
    ["import os\nos.setsid()", "import subprocess\nsubprocess.Popen(['sleep', '60'], start_new_session=True)"],
    ids=["setsid", "start_new_session"],
)
def test_leaving_the_session_is_refused(source: str) -> None:
    result = run(source, allow_exec=True)
    assert result.status == "failed" and "PermissionError" in result.stderr


def test_multiprocessing_pool_works_within_the_cap() -> None:
    result = run(
        """
        import multiprocessing

        def square(x):
            return x * x

        with multiprocessing.get_context("fork").Pool(3) as pool:
            print(pool.map(square, range(6)))
        """
    )
    assert result.passed, result.stderr
    assert result.stdout == "[0, 1, 4, 9, 16, 25]\n"


def test_the_calling_process_survives_kill_attempts() -> None:
    """The sample targets its parent, i.e. this pytest process; reaching the asserts means it survived."""
    result = run("import os, signal\nprint(os.getppid(), flush=True)\nos.kill(os.getppid(), signal.SIGKILL)")
    assert result.status == "failed" and "PermissionError" in result.stderr
    assert int(result.stdout) == os.getpid()


@pytest.mark.parametrize(
    "template",
    [
        "import os\nos.kill({pid}, 9)",
        "import os\nos.killpg({pid}, 9)",
        "import os\nos.kill(-{pid}, 9)",
        "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open({pid}), 9)",
    ],
    ids=["kill", "killpg", "kill-negative", "pidfd"],
)
def test_processes_outside_the_sandbox_cannot_be_signalled(template: str) -> None:
    victim = subprocess.Popen(["sleep", "60"], start_new_session=True)  # own group: a broken guard hits only it
    try:
        result = run(template.format(pid=victim.pid))
        assert result.status == "failed" and "PermissionError" in result.stderr, result.stderr
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_sample_can_signal_its_own_children() -> None:
    result = run(
        """
        import os, signal, time
        child = os.fork()
        if child == 0:
            time.sleep(60)
            os._exit(0)
        os.kill(child, signal.SIGKILL)
        print(os.waitpid(child, 0)[1] & 0x7F)
        """
    )
    assert result.passed and result.stdout == f"{int(signal.SIGKILL)}\n"


def test_rlimit_nproc_is_lowered_as_a_kernel_backstop() -> None:
    result = run("import resource\nprint(resource.getrlimit(resource.RLIMIT_NPROC)[0])", max_processes=5)
    soft_limit = int(result.stdout)
    assert soft_limit != resource.RLIM_INFINITY and soft_limit >= 5

"""Run untrusted (model-generated) Python programs in separate, resource-limited processes.

Every program runs in its own ``python -I -u`` interpreter started with ``start_new_session=True`` in a fresh
temporary directory that is its working directory, ``HOME`` and ``TMPDIR``; the environment is scrubbed and
stdin is ``/dev/null``. Nothing is ever ``exec``-ed in the flarectl process. The child interpreter runs this
very file as a script (``python -I sandbox.py CONFIG``): it lowers its resource limits, installs the guards
below, then compiles and executes the sample as ``__main__``.

What is enforced, and by whom (no user/network namespaces, no cgroups, no seccomp are used):

======================  =======================================================================================
Limit                   Enforced by
======================  =======================================================================================
wall-clock timeout      the parent: on expiry it SIGKILLs the sample's whole session (process group first, then
                        any session member that moved to another group), before reaping the root process so the
                        session id cannot be reused meanwhile.
memory                  kernel, ``RLIMIT_AS`` (address space, per process) -> ``MemoryError`` -> status "oom".
CPU time                kernel, ``RLIMIT_CPU`` (per process, ~timeout) -> SIGXCPU -> status "timeout".
file size               kernel, ``RLIMIT_FSIZE`` (also caps the captured stdout/stderr files).
core dumps              kernel, ``RLIMIT_CORE = 0``.
process count           prelude: every fork/spawn is refused (``BlockingIOError``/EAGAIN) once ``max_processes``
                        processes (zombies included, the sample's own interpreter included) are alive in the
                        session. Kernel ``RLIMIT_NPROC`` is also lowered, but it is per *user* and the kernel does
                        not apply it to root at all, so for root only the prelude cap holds.
network                 prelude only: non-``AF_UNIX`` sockets and name resolution raise ``PermissionError``.
filesystem writes       prelude only: ``open``/``os.open`` in a write mode and the mutating ``os``/``posix``
                        calls (remove, rename, mkdir, chmod, link, ...) and ``shutil.rmtree`` are refused for
                        paths (symlinks resolved) outside the working directory. Reads are not restricted.
killing other processes prelude only: ``os.kill``/``os.killpg``/``os.pidfd_open`` may only target the session.
leaving the session     prelude only: ``os.setsid`` and ``start_new_session`` are refused.
running other programs  prelude only: ``subprocess``, ``os.system``, ``os.exec*``, ``os.posix_spawn*`` are refused
                        unless ``allow_exec=True``; then they are counted against the process cap, but the
                        programs they run are *not* guarded by the prelude (only the kernel limits apply).
fake success            prelude: ``SystemExit`` (``sys.exit``/``exit``) and ``os._exit`` in the sample's own
                        process count as failures, as in the official HumanEval harness.
======================  =======================================================================================

The prelude is a reliability guard against accidents of generated code, not a security boundary: deliberately
hostile Python (``ctypes``, ``io.FileIO``, recovering the wrapped originals) can get around it, and everything
runs with the caller's uid. For hostile code, run flarectl itself inside a container/VM without network.
Not limited at all: total disk use inside the working directory (only the size of each file), reads anywhere.
The timeout counts from process launch, so it includes the ~0.1-0.3 s interpreter start-up.
"""

from __future__ import annotations

import errno
import json
import math
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, NoReturn, Sequence

Status = Literal["passed", "failed", "timeout", "crashed", "oom"]

_RUNNER_PATH = Path(__file__).resolve()
_EXIT_FAILED = 1
_EXIT_OOM = 3
_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
_KILL_GRACE_S = 2.0
_MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ExecutionResult:
    """Outcome of one sandboxed program: status, exit code, bounded output tails and wall-clock seconds.

    ``returncode`` is negative when the process died from a signal (``-9`` after a timeout kill).
    """

    status: Status
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True, slots=True)
class _ChildConfig:
    """Everything the child runner needs; travels as JSON on its command line."""

    sample_path: str
    workdir: str
    memory_bytes: int
    cpu_seconds: int
    file_bytes: int
    max_processes: int
    allow_exec: bool


# ----------------------------------------------------------------------------------------------------------------
# Parent side
# ----------------------------------------------------------------------------------------------------------------


def run_program(
    source: str,
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    max_processes: int = 32,
    max_file_mb: int = 16,
    allow_exec: bool = False,
    output_tail_bytes: int = 4096,
    python: str | None = None,
) -> ExecutionResult:
    """Run ``source`` as ``__main__`` in a fresh sandboxed interpreter and classify the outcome.

    Status: "passed" (ran to completion), "failed" (exception, ``SystemExit``, non-zero exit), "timeout" (wall
    clock or CPU limit), "oom" (``MemoryError``) or "crashed" (killed by another signal). Raises ``OSError`` only
    when the interpreter itself cannot be started.
    """
    import tempfile  # parent-only imports stay lazy: the child runner imports this file at every start

    _validate_limits(timeout_s, memory_mb, max_processes, max_file_mb, output_tail_bytes)
    with tempfile.TemporaryDirectory(prefix="flarectl-sandbox-", ignore_cleanup_errors=True) as outer:
        outer_dir = Path(outer)
        workdir = outer_dir / "work"
        workdir.mkdir()
        sample_path = outer_dir / "sample.py"
        sample_path.write_text(source, encoding="utf-8")
        config = _ChildConfig(
            sample_path=str(sample_path),
            workdir=str(workdir),
            memory_bytes=memory_mb * _MIB,
            cpu_seconds=math.ceil(timeout_s) + 1,
            file_bytes=max_file_mb * _MIB,
            max_processes=max_processes,
            allow_exec=allow_exec,
        )
        stdout_path, stderr_path = outer_dir / "stdout.log", outer_dir / "stderr.log"
        started = time.monotonic()
        returncode, timed_out = _run_child(python or sys.executable, config, stdout_path, stderr_path, timeout_s)
        seconds = time.monotonic() - started
        return ExecutionResult(
            status=_classify(returncode, timed_out),
            returncode=returncode,
            stdout=_read_tail(stdout_path, output_tail_bytes),
            stderr=_read_tail(stderr_path, output_tail_bytes),
            seconds=seconds,
        )


def run_many(
    sources: Iterable[str], *, workers: int | None = None, **run_kwargs: Any
) -> list[ExecutionResult]:
    """Run many programs concurrently (one subprocess each, ``workers`` at a time); results keep input order.

    ``run_kwargs`` are passed to `run_program`. ``workers`` defaults to the number of CPUs (at most 16).
    """
    from concurrent.futures import ThreadPoolExecutor

    programs = list(sources)
    if not programs:
        return []
    if workers is None:
        workers = min(16, os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    with ThreadPoolExecutor(max_workers=min(workers, len(programs)), thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda source: run_program(source, **run_kwargs), programs))


def _validate_limits(timeout_s: float, memory_mb: int, max_processes: int, max_file_mb: int, tail: int) -> None:
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if memory_mb < 64:
        raise ValueError(f"memory_mb must be >= 64 (the interpreter needs it), got {memory_mb}")
    if max_processes < 1:
        raise ValueError(f"max_processes must be >= 1 (the sample's own interpreter), got {max_processes}")
    if max_file_mb < 1 or tail < 0:
        raise ValueError(f"max_file_mb must be >= 1 and output_tail_bytes >= 0, got {max_file_mb}, {tail}")


def _scrubbed_env(workdir: str) -> dict[str, str]:
    """A minimal environment: nothing inherited from flarectl (no PYTHONPATH, tokens, proxies, CUDA vars)."""
    return {
        "PATH": _SAFE_PATH,
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _run_child(
    python: str, config: _ChildConfig, stdout_path: Path, stderr_path: Path, timeout_s: float
) -> tuple[int, bool]:
    """Start the child in its own session, wait up to ``timeout_s``, then kill the session; (returncode, timed out).

    Output goes to files rather than pipes so that a leftover grandchild holding the pipe open cannot stall us.
    Rlimits are set by the child runner itself (no ``preexec_fn``: it is unsafe with `run_many`'s threads).
    """
    argv = [python, "-I", "-u", str(_RUNNER_PATH), json.dumps(asdict(config))]
    with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
        process = subprocess.Popen(
            argv,
            cwd=config.workdir,
            env=_scrubbed_env(config.workdir),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            close_fds=True,
            start_new_session=True,
        )
    try:
        timed_out = not _wait_without_reaping(process.pid, timeout_s)
    finally:
        kill_session(process.pid)
        returncode = process.wait()
    return returncode, timed_out


def _wait_without_reaping(pid: int, timeout_s: float) -> bool:
    """Wait until ``pid`` exits (True) or ``timeout_s`` passes (False), leaving it a zombie so its id stays taken."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return _poll_without_reaping(pid, timeout_s)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(max(1, math.ceil(timeout_s * 1000))))
    finally:
        os.close(pidfd)


def _poll_without_reaping(pid: int, timeout_s: float) -> bool:
    """Fallback for kernels without pidfd: poll ``waitid(WNOWAIT)``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


def kill_session(session_id: int, *, grace_s: float = _KILL_GRACE_S) -> bool:
    """SIGKILL every process of session ``session_id``; True once none is left alive (zombies aside).

    Kills the process group (the session leader's) first, then any member that changed its group. Only call it
    while the session leader is unreaped, otherwise the id could be reused by an unrelated session.
    """
    deadline = time.monotonic() + grace_s
    while True:
        _signal_quietly(lambda: os.killpg(session_id, signal.SIGKILL))
        alive = live_session_members(session_id)
        if not alive:
            return True
        if time.monotonic() >= deadline:
            return False
        for pid in alive:
            _signal_quietly(lambda pid=pid: os.kill(pid, signal.SIGKILL))
        time.sleep(0.01)


def live_session_members(session_id: int) -> list[int]:
    """Pids of processes in session ``session_id`` that are not zombies."""
    return [pid for pid, state in _session_members(session_id) if state not in "ZX"]


def _signal_quietly(send: Callable[[], None]) -> None:
    try:
        send()
    except (ProcessLookupError, PermissionError):
        pass


_STAT_PGRP, _STAT_SESSION = 2, 3  # indices into `_proc_stat` fields


def _session_members(session_id: int) -> list[tuple[int, str]]:
    """(pid, state letter) of every process (zombies included) whose session is ``session_id``."""
    return _processes_where(_STAT_SESSION, session_id)


def _processes_where(field: int, value: int) -> list[tuple[int, str]]:
    """(pid, state letter) of every visible process whose /proc stat ``field`` equals ``value``."""
    matches = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _proc_stat(entry.name)
            if stat is not None and stat[field] == str(value):
                matches.append((int(entry.name), stat[0]))
    return matches


def _proc_stat(pid: str) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [state, ppid, pgrp, session, ...]; None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read()
    except OSError:
        return None
    return raw[raw.rfind(b")") + 2 :].decode("ascii", "replace").split()


def _classify(returncode: int, timed_out: bool) -> Status:
    if timed_out or returncode == -signal.SIGXCPU:
        return "timeout"
    if returncode == 0:
        return "passed"
    if returncode == _EXIT_OOM:
        return "oom"
    return "crashed" if returncode < 0 else "failed"


def _read_tail(path: Path, limit: int) -> str:
    """The last ``limit`` bytes of ``path`` as text, marked when truncated."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        handle.seek(max(0, size - limit))
        tail = handle.read(limit).decode("utf-8", "replace")
    return tail if size <= limit else f"[... {size - limit} bytes cut ...]\n{tail}"


# ----------------------------------------------------------------------------------------------------------------
# Child side: runs inside the sandboxed interpreter (``python -I sandbox.py CONFIG``), stdlib only.
# ----------------------------------------------------------------------------------------------------------------


def _child_main(config_json: str) -> NoReturn:
    """Lower rlimits, install the guards, run the sample; exit 0 only if it ran to completion."""
    config = _ChildConfig(**json.loads(config_json))
    source = Path(config.sample_path).read_text(encoding="utf-8")
    real_exit = os._exit
    _apply_rlimits(config)
    _Guard(config).install()
    code = _run_sample(source, config.sample_path)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - the sample may have replaced or closed the stream
            pass
    real_exit(code)


def _run_sample(source: str, filename: str) -> int:
    """Execute the sample as a fresh ``__main__`` module; map how it ended to the runner's exit code."""
    import traceback
    import types

    module = types.ModuleType("__main__")
    sys.modules["__main__"] = module
    sys.argv = [filename]
    try:
        exec(compile(source, filename, "exec", dont_inherit=True), module.__dict__)  # noqa: S102 - sandboxed
    except MemoryError:
        traceback.print_exc()
        return _EXIT_OOM
    except SystemExit as exit_request:
        print(f"sandbox: the sample raised SystemExit({exit_request.code!r}); counted as a failure", file=sys.stderr)
        return _EXIT_FAILED
    except BaseException:  # noqa: BLE001 - any exception of the sample is a failure, reported on stderr
        traceback.print_exc()
        return _EXIT_FAILED
    return 0


def _apply_rlimits(config: _ChildConfig) -> None:
    """Lower the kernel limits of this (child) process before any sample code runs."""
    import resource

    _lower_rlimit(resource.RLIMIT_AS, config.memory_bytes)
    _lower_rlimit(resource.RLIMIT_CPU, config.cpu_seconds, hard_extra=1)
    _lower_rlimit(resource.RLIMIT_FSIZE, config.file_bytes)
    _lower_rlimit(resource.RLIMIT_CORE, 0)
    _lower_rlimit(resource.RLIMIT_NPROC, _tasks_of_current_user() + config.max_processes)


def _lower_rlimit(kind: int, value: int, hard_extra: int = 0) -> None:
    """Set soft limit ``value`` and hard limit ``value + hard_extra``, never above the existing hard limit."""
    import resource

    _, hard = resource.getrlimit(kind)

    def capped(limit: int) -> int:
        return limit if hard == resource.RLIM_INFINITY else min(limit, hard)

    resource.setrlimit(kind, (capped(value), capped(value + hard_extra)))


def _tasks_of_current_user() -> int:
    """Threads owned by this real uid: what the kernel compares with RLIMIT_NPROC."""
    uid, tasks = os.getuid(), 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid == uid:
                tasks += len(os.listdir(f"/proc/{entry.name}/task"))
        except OSError:
            continue
    return tasks


class _Guard:
    """The Python-level prelude: refuse network, writes outside the working directory, process escapes."""

    _ALWAYS_WRITABLE = frozenset({os.devnull})
    _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    _ONE_PATH_WRITES = (
        "mkdir", "rmdir", "remove", "unlink", "chmod", "lchmod", "chown", "lchown", "truncate", "utime",
        "mkfifo", "mknod", "setxattr", "removexattr", "chflags", "lchflags", "fchmod", "fchown",
    )  # fmt: skip  (fchmod/fchown: the fd's file must be inside too)
    _TWO_PATH_WRITES = ("rename", "replace", "link")

    def __init__(self, config: _ChildConfig) -> None:
        self.root = os.path.realpath(config.workdir)
        self.session = os.getsid(0)
        self.max_processes = config.max_processes
        self.allow_exec = config.allow_exec
        self.realpath = os.path.realpath
        self.getcwd = os.getcwd
        self.getpid = os.getpid

    # -- installation ---------------------------------------------------------------------------------------

    def install(self) -> None:
        import posix

        for module in (os, posix):
            self._guard_filesystem(module)
            self._guard_processes(module)
        self._guard_open_and_shutil()
        self._guard_network()
        self._guard_subprocess()
        self._guard_resource()

    def _replace(self, owner: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        original = getattr(owner, name, None)
        if original is not None:
            setattr(owner, name, make(original))

    # -- filesystem -----------------------------------------------------------------------------------------

    def _guard_filesystem(self, module: Any) -> None:
        for name in self._ONE_PATH_WRITES:
            self._replace(module, name, lambda fn, name=name: self._one_path_write(name, fn))
        for name in self._TWO_PATH_WRITES:
            self._replace(module, name, lambda fn, name=name: self._two_path_write(name, fn))
        self._replace(module, "symlink", self._symlink)
        self._replace(module, "open", self._os_open)
        self._replace(module, "chroot", lambda fn: self._refused("chroot", errno.EPERM))

    def _guard_open_and_shutil(self) -> None:
        import builtins
        import io
        import shutil

        guarded_open = self._builtin_open(builtins.open)
        builtins.open = guarded_open
        io.open = guarded_open
        self._replace(shutil, "rmtree", self._rmtree)

    def is_writable(self, path: Any, dir_fd: int | None = None) -> bool:
        """True if ``path`` (str/bytes/PathLike, or an fd) resolves inside the working directory."""
        if isinstance(path, int):
            path = f"/proc/self/fd/{path}"
        path = os.fsdecode(os.fspath(path))
        if os.path.normpath(path) in self._ALWAYS_WRITABLE:
            return True
        base = self.getcwd() if dir_fd is None else os.readlink(f"/proc/self/fd/{dir_fd}")
        resolved = self.realpath(os.path.join(base, path))
        return resolved == self.root or resolved.startswith(self.root + os.sep)

    def _check_write(self, operation: str, path: Any, dir_fd: int | None = None) -> None:
        if not self.is_writable(path, dir_fd):
            raise PermissionError(
                errno.EACCES, f"sandbox: {operation} outside the working directory is not allowed", os.fspath(path)
            )

    def _one_path_write(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def guarded(path: Any, *args: Any, **kwargs: Any) -> Any:
            self._check_write(name, path, kwargs.get("dir_fd"))
            return original(path, *args, **kwargs)

        return guarded

    def _two_path_write(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def guarded(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
            self._check_write(name, src, kwargs.get("src_dir_fd"))
            self._check_write(name, dst, kwargs.get("dst_dir_fd"))
            return original(src, dst, *args, **kwargs)

        return guarded

    def _symlink(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def guarded(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
            self._check_write("symlink", dst, kwargs.get("dir_fd"))
            return original(src, dst, *args, **kwargs)

        return guarded

    def _os_open(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def guarded(path: Any, flags: int, *args: Any, **kwargs: Any) -> Any:
            if flags & self._WRITE_FLAGS:
                self._check_write("open for writing", path, kwargs.get("dir_fd"))
            return original(path, flags, *args, **kwargs)

        return guarded

    def _builtin_open(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def guarded(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if not isinstance(file, int) and any(flag in mode for flag in "wax+"):
                self._check_write("open for writing", file)
            return original(file, mode, *args, **kwargs)

        return guarded

    def _rmtree(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def guarded(path: Any, *args: Any, **kwargs: Any) -> Any:
            self._check_write("rmtree", path, kwargs.get("dir_fd"))
            return original(path, *args, **kwargs)

        return guarded

    # -- processes ------------------------------------------------------------------------------------------

    def _guard_processes(self, module: Any) -> None:
        for name in ("fork", "forkpty"):
            self._replace(module, name, self._counted)
        for name in ("posix_spawn", "posix_spawnp"):
            self._replace(module, name, self._spawn)
        self._replace(module, "system", lambda fn: self._executing(self._counted(fn)))
        for name in ("execv", "execve"):
            self._replace(module, name, self._executing)
        self._replace(module, "setsid", lambda fn: self._refused("setsid (leaving the sandbox session)", errno.EPERM))
        self._replace(module, "kill", self._kill)
        self._replace(module, "killpg", self._killpg)
        self._replace(module, "pidfd_open", self._pidfd_open)
        self._replace(module, "_exit", self._exit)

    def _guard_subprocess(self) -> None:
        import _posixsubprocess

        for owner, name in ((_posixsubprocess, "fork_exec"), (subprocess, "_fork_exec")):
            self._replace(owner, name, self._fork_exec)

    def _guard_resource(self) -> None:
        import resource

        for name in ("setrlimit", "prlimit"):
            self._replace(resource, name, lambda fn, name=name: self._refused(f"resource.{name}", errno.EPERM))

    def _refused(self, name: str, code: int) -> Callable[..., NoReturn]:
        def refused(*args: Any, **kwargs: Any) -> NoReturn:
            raise PermissionError(code, f"sandbox: {name} is not allowed")

        return refused

    def session_process_count(self) -> int:
        """Processes (zombies included) alive in this sandbox's session."""
        return len(_session_members(self.session))

    def _check_capacity(self) -> None:
        if self.session_process_count() >= self.max_processes:
            raise BlockingIOError(errno.EAGAIN, f"sandbox: process cap of {self.max_processes} reached")

    def _check_exec_allowed(self) -> None:
        if not self.allow_exec:
            raise PermissionError(errno.EPERM, "sandbox: running other programs is disabled (allow_exec=False)")

    def _counted(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def guarded(*args: Any, **kwargs: Any) -> Any:
            self._check_capacity()
            return original(*args, **kwargs)

        return guarded

    def _executing(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def guarded(*args: Any, **kwargs: Any) -> Any:
            self._check_exec_allowed()
            return original(*args, **kwargs)

        return guarded

    def _spawn(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def guarded(*args: Any, **kwargs: Any) -> Any:
            self._check_exec_allowed()
            if kwargs.get("setsid"):
                raise PermissionError(errno.EPERM, "sandbox: leaving the session is not allowed")
            self._check_capacity()
            return original(*args, **kwargs)

        return guarded

    def _fork_exec(self, original: Callable[..., Any]) -> Callable[..., Any]:
        call_setsid_index = 15  # position of start_new_session in _posixsubprocess.fork_exec (CPython 3.10-3.13)

        def guarded(*args: Any, **kwargs: Any) -> Any:
            self._check_exec_allowed()
            if len(args) > call_setsid_index and args[call_setsid_index]:
                raise PermissionError(errno.EPERM, "sandbox: start_new_session is not allowed")
            self._check_capacity()
            return original(*args, **kwargs)

        return guarded

    def in_session(self, pid: int) -> bool:
        try:
            return os.getsid(pid) == self.session
        except ProcessLookupError:
            return True  # nothing to protect; the real call reports ESRCH

    def group_in_session(self, pgid: int) -> bool:
        return all(self.in_session(pid) for pid, _ in _processes_where(_STAT_PGRP, pgid))

    def _kill(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def guarded(pid: int, sig: int) -> Any:
            allowed = pid == 0 or (pid > 0 and self.in_session(pid)) or (pid < -1 and self.group_in_session(-pid))
            if not allowed:
                message = f"sandbox: signalling pid {pid} outside the sandbox is not allowed"
                raise PermissionError(errno.EPERM, message)
            return original(pid, sig)

        return guarded

    def _killpg(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def guarded(pgid: int, sig: int) -> Any:
            if pgid < 0 or not self.group_in_session(pgid or os.getpgid(0)):
                message = f"sandbox: signalling group {pgid} outside the sandbox is not allowed"
                raise PermissionError(errno.EPERM, message)
            return original(pgid, sig)

        return guarded

    def _pidfd_open(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def guarded(pid: int, *args: Any, **kwargs: Any) -> Any:
            if not self.in_session(pid):
                raise PermissionError(errno.EPERM, f"sandbox: pidfd_open({pid}) outside the sandbox is not allowed")
            return original(pid, *args, **kwargs)

        return guarded

    def _exit(self, original: Callable[..., Any]) -> Callable[..., Any]:
        """``os._exit`` in the sample's own process becomes ``SystemExit`` (a failure); forked children exit."""
        root_pid = self.getpid()

        def guarded(status: int) -> Any:
            if self.getpid() == root_pid:
                raise SystemExit(status)
            return original(status)

        return guarded

    # -- network --------------------------------------------------------------------------------------------

    def _guard_network(self) -> None:
        import _socket
        import socket

        local_only = self._local_socket_init
        original_init = socket.socket.__init__

        def guarded_init(sock: Any, family: int = -1, type: int = -1, proto: int = -1, fileno: Any = None) -> None:
            local_only(family, fileno)
            original_init(sock, family, type, proto, fileno)

        socket.socket.__init__ = guarded_init  # type: ignore[method-assign]
        c_socket = _socket.socket

        class LocalOnlySocket(c_socket):  # type: ignore[misc, valid-type]
            def __init__(sock, family: int = -1, type: int = -1, proto: int = -1, fileno: int | None = None) -> None:
                local_only(family, fileno)
                c_socket.__init__(sock, family, type, proto, fileno)

        _socket.socket = _socket.SocketType = LocalOnlySocket  # type: ignore[misc]
        resolvers = ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo", "getfqdn")
        for owner in (socket, _socket):
            for name in resolvers:
                refusal = self._refused(f"socket.{name} (network)", errno.EACCES)
                self._replace(owner, name, lambda fn, refusal=refusal: refusal)

    @staticmethod
    def _local_socket_init(family: int, fileno: int | None) -> None:
        import socket

        if fileno is None and family != socket.AF_UNIX:
            raise PermissionError(errno.EACCES, "sandbox: network access is disabled (only AF_UNIX sockets)")


if __name__ == "__main__":
    _child_main(sys.argv[1])

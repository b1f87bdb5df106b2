"""Running each job in its own process: a fork server (or a fresh interpreter) per job, killed with its process
group on timeout, memory limit or a dead parent; results written atomically to a work directory.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from typing import Any

from ..errors import SurgeryError
from .job import Job, convert_one, empty_result
from .summary import error_cause

__all__ = ["IsolatedJob", "child_cli", "finite_json", "fork_server_main", "remove_stale_workdirs", "run_isolated", "write_atomic"]


#: what the fork server imports once for all model processes
_PRELOAD = ["torch", "timm", "fvcore.nn", "fxsurgeon", "fxsurgeon.cli", "fxsurgeon.recipes", "fxsurgeon.convert"]


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies, so a killed batch leaves no orphans."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # best effort: without it an orphan still finishes its one model and exits
        return


def _child_main(workdir: str) -> None:
    """A model's process: isolate, run :func:`convert_one` on ``workdir/job.json``, write the result, exit."""
    parent = os.getppid()
    with contextlib.suppress(OSError):
        os.setsid()  # own process group: a timeout kills the model and whatever it started
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    log = os.open(os.path.join(workdir, "log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    job = _read_job(workdir)
    paths = _read_json(os.path.join(workdir, "sys_path.json")) or []
    # the model is importable here wherever it was importable in the process that asked for it
    sys.path[:] = [*paths, *(p for p in sys.path if p not in paths)]
    if job.max_memory:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (job.max_memory, job.max_memory))
    current = ["start"]

    def phase(name: str) -> None:
        current[0] = name
        write_atomic(os.path.join(workdir, "phase"), name.encode())

    try:
        result = convert_one(job, phase)
    except BaseException as exc:  # every failure becomes that model's record
        result = empty_result(job.model)
        message = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, MemoryError) or "can't allocate memory" in str(exc):
            message = f"out of memory (max_memory={job.max_memory}): {message}"
        result.update(status="error", error=message[:4000], phase=current[0],
                      traceback="".join(traceback.format_exception(exc)[-12:])[-4000:])
    try:
        blob = json.dumps(finite_json(result), default=str).encode()
    except Exception as exc:  # never lose the model's status to a serialisation problem
        blob = json.dumps(empty_result(job.model) | {"status": "error", "error": f"result not JSON: {exc}"}).encode()
    write_atomic(os.path.join(workdir, "result.json"), blob)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: nothing left to save, and some extensions crash in it


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _read_job(workdir: str) -> Job:
    with open(os.path.join(workdir, "job.json")) as f:
        data = json.load(f)
    if data.get("input_size") is not None:
        data["input_size"] = tuple(data["input_size"])
    return Job(**data)


def child_cli() -> None:
    """``python -c 'from fxsurgeon.batch.isolation import child_cli; child_cli()' WORKDIR``: a fresh interpreter."""
    _child_main(sys.argv[1])


def fork_server_main() -> None:
    """The fork server: import torch, timm and fxsurgeon once, then fork one process per model on request.

    Protocol on stdin/stdout: the parent writes a work directory per line, the server forks a child that
    runs :func:`_child_main` on it and answers the child's pid; when a child ends, the server reaps it and
    writes its exit code (negative: killed by that signal) to ``WORKDIR/exit``. It exits when its stdin
    closes (the batch ended or died); its children follow (``PR_SET_PDEATHSIG``).
    """
    import selectors
    import warnings

    _die_with_parent()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in _PRELOAD:
            with contextlib.suppress(Exception):
                __import__(name)
    children: dict[int, str] = {}
    sel = selectors.DefaultSelector()
    sel.register(0, selectors.EVENT_READ)
    os.write(1, b"ready\n")
    buf = b""
    alive = True
    while alive or children:
        if alive and sel.select(timeout=0.05):
            data = os.read(0, 65536)
            if not data:
                alive = False  # the batch is gone: reap what is left, then leave
                for pid in children:
                    with contextlib.suppress(OSError):
                        os.killpg(pid, signal.SIGKILL)
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                workdir = line.decode()
                pid = os.fork()
                if pid == 0:
                    try:
                        sel.close()
                        _child_main(workdir)
                    finally:
                        os._exit(70)
                children[pid] = workdir
                os.write(1, f"{pid}\n".encode())
        elif not alive:
            time.sleep(0.05)
        while children:
            try:
                if hasattr(os, "waitid"):
                    pid = _exited_child(-1)
                    if pid is None:
                        break
                    # whatever the model started dies with it; the unreaped leader keeps the group id from reuse
                    _kill_group(pid)
                    pid, status = os.waitpid(pid, 0)
                else:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                    if pid == 0:
                        break
                    _kill_group(pid)
            except ChildProcessError:
                children.clear()
                break
            workdir = children.pop(pid, None)
            if workdir is not None:
                with contextlib.suppress(OSError):
                    write_atomic(os.path.join(workdir, "exit"), str(os.waitstatus_to_exitcode(status)).encode())
    os._exit(0)


def _exited_child(pid: int) -> int | None:
    """The pid of an exited, not yet reaped child (``pid`` or, with -1, any), without reaping it."""
    if not hasattr(os, "waitid"):
        return None
    idtype, ident = (os.P_ALL, 0) if pid == -1 else (os.P_PID, pid)
    info = os.waitid(idtype, ident, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    return info.si_pid if info is not None and info.si_pid else None


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _start_time(pid: int) -> int | None:
    """Kernel start time of a process (clock ticks since boot), or None when it is gone or unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


_WORKDIR_PREFIX = "fxsurgeon-batch-"


_WORKDIR_RE = re.compile(rf"^{_WORKDIR_PREFIX}(\d+)-(\d+)-")


def remove_stale_workdirs(tmpdir: str | None = None) -> list[str]:
    """Remove the work directories of batch runs whose process is gone (killed with SIGKILL, say).

    A work directory is named after the process that made it (pid and kernel start time), so one whose owner
    no longer runs is left over and removed here; directories of live runs, other users' and unrelated ones
    are kept. Returns the removed paths.
    """
    tmpdir = tmpdir or tempfile.gettempdir()
    removed = []
    try:
        entries = list(os.scandir(tmpdir))
    except OSError:
        return removed
    for entry in entries:
        m = _WORKDIR_RE.match(entry.name)
        if not m:
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
        except OSError:
            continue
        pid, started = int(m.group(1)), int(m.group(2))
        if pid == os.getpid() or (_start_time(pid) == started and started):
            continue
        if not started and _start_time(pid) is not None:
            continue  # no start time known where it was made: keep while that pid lives
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.path)
    return removed


_SWEPT = False


class _ForkServer:
    """Parent side of :func:`fork_server_main`: one server per process, shared by threads (Dask workers)."""

    def __init__(self) -> None:
        import threading

        self.lock = threading.Lock()
        self.proc: Any = None

    def _ensure(self) -> None:
        import subprocess

        if self.proc is not None and self.proc.poll() is None:
            return
        code = "from fxsurgeon.batch.isolation import fork_server_main; fork_server_main()"
        # the server imports the same fxsurgeon, torch and timm as this process, wherever they came from
        paths = [p for p in sys.path if isinstance(p, str)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, bufsize=0, start_new_session=True, env=env)
        if self.proc.stdout.readline() != b"ready\n":
            raise SurgeryError("fxsurgeon batch: the fork server did not start (is fxsurgeon importable?)")

    def fork(self, workdir: str) -> int:
        with self.lock:
            for _attempt in range(2):  # a server that died since the last model is replaced once
                self._ensure()
                try:
                    self.proc.stdin.write(f"{workdir}\n".encode())
                    line = self.proc.stdout.readline()
                except OSError:  # a broken pipe: the server is gone
                    line = b""
                if line.strip().isdigit():
                    return int(line)
                self.proc.kill()
                self.proc.wait()
            raise SurgeryError("fxsurgeon batch: the fork server died twice in a row; rerun, or use "
                               "launcher='subprocess'")


_SERVER: _ForkServer | None = None


def _fork_server() -> _ForkServer:
    # One per process, started on first use, like multiprocessing's own fork server: it costs one import of
    # torch and timm, which every model process then shares.
    global _SERVER
    if _SERVER is None:
        _SERVER = _ForkServer()
    return _SERVER


def write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def finite_json(obj: Any) -> Any:
    """NaN/inf → None, so every line is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


class IsolatedJob:
    """One model's process: start it, poll it, kill its process group, read its result."""

    def __init__(self, job: Job, launcher: str = "auto") -> None:
        if launcher == "auto":
            launcher = "fork" if hasattr(os, "fork") and sys.platform != "darwin" else "subprocess"
        if launcher not in ("fork", "subprocess"):
            raise SurgeryError(f"launcher must be 'auto', 'fork' or 'subprocess', got {launcher!r}")
        self.job = job
        self.launcher = launcher
        global _SWEPT
        if not _SWEPT:  # once per process: what a SIGKILLed earlier run left behind
            _SWEPT = True
            remove_stale_workdirs()
        owner = f"{os.getpid()}-{_start_time(os.getpid()) or 0}"
        self.workdir = tempfile.mkdtemp(prefix=f"{_WORKDIR_PREFIX}{owner}-")
        self.proc: Any = None
        self.server: Any = None
        self.server_died: int | None = None
        self.pid = -1
        self.started = 0.0
        self.timed_out = False

    def start(self) -> IsolatedJob:
        with open(os.path.join(self.workdir, "job.json"), "w") as f:
            json.dump(asdict(self.job), f)
        with open(os.path.join(self.workdir, "sys_path.json"), "w") as f:
            json.dump([p for p in sys.path if isinstance(p, str)], f)
        if self.launcher == "fork":
            server = _fork_server()
            self.pid = server.fork(self.workdir)
            self.server = server.proc  # the server that reaps this model and reports its exit code
        else:
            import subprocess

            code = "from fxsurgeon.batch.isolation import child_cli; child_cli()"
            self.proc = subprocess.Popen([sys.executable, "-c", code, self.workdir], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.pid = self.proc.pid
        self.started = time.monotonic()  # after the fork server's start-up: a timeout is the model's own time
        return self

    def exitcode(self) -> int | None:
        if self.launcher == "subprocess":
            if self.proc.returncode is None:
                with contextlib.suppress(ChildProcessError, OSError):
                    if _exited_child(self.proc.pid) is not None:
                        _kill_group(self.proc.pid)  # before reaping: the group id cannot be reused yet
            return self.proc.poll()
        text = _read_text(os.path.join(self.workdir, "exit"))
        if text:
            return int(text)
        if self.server_died is not None:
            return -int(signal.SIGKILL)
        return None

    def _server_gone(self) -> bool:
        """The fork server that would report this model's exit has died: nobody will, so stop waiting."""
        if self.server is None or self.server.poll() is None:
            return False
        if _read_text(os.path.join(self.workdir, "exit")):
            return False
        self.server_died = self.server.returncode
        _kill_group(self.pid)  # its children die with it (PR_SET_PDEATHSIG); the group's stragglers too
        return True

    def poll(self) -> bool:
        """True once the process has ended (killing it first when past the timeout)."""
        if self.exitcode() is not None or self._server_gone():
            return True
        if self.job.timeout is not None and time.monotonic() - self.started > self.job.timeout:
            self.timed_out = True
            self.kill()
            return True
        return False

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # the model's group: it and anything it started
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.pid, signal.SIGKILL)  # in case it died before making its group
        deadline = time.monotonic() + 10
        while self.exitcode() is None and time.monotonic() < deadline:  # reaped: no zombie left
            time.sleep(0.02)

    def result(self) -> dict[str, Any]:
        seconds = time.monotonic() - self.started
        path = os.path.join(self.workdir, "result.json")
        phase = _read_text(os.path.join(self.workdir, "phase")) or "start"
        res: dict[str, Any] | None = None
        if os.path.exists(path) and not self.timed_out:
            try:
                with open(path) as f:
                    res = json.load(f)
            except (OSError, ValueError):
                res = None
        if res is None:
            res = empty_result(self.job.model)
            if self.server_died is not None and not self.timed_out:
                res.update(status="error", error=f"the fork server died (exit code {self.server_died}) while this "
                           f"model ran (during {phase}): its result is lost; the next model gets a new server")
            elif self.timed_out:
                res.update(status="timeout", error=f"timed out after {self.job.timeout:g} s (during {phase})")
            else:
                code = self.exitcode()
                tail = _tail(os.path.join(self.workdir, "log"))
                if code is not None and code < 0:
                    try:
                        name = signal.Signals(-code).name
                    except ValueError:
                        name = f"signal {-code}"
                    why = " (the out-of-memory killer sends SIGKILL)" if -code == signal.SIGKILL else ""
                    msg = f"process killed by {name}{why} during {phase}"
                else:
                    msg = f"process exited with code {code} during {phase} without a result"
                res.update(status="error", error=msg + (f"; last output: {tail}" if tail else ""))
            res["phase"] = phase
        res["seconds"] = seconds
        res["cause"] = res.get("cause") or (error_cause(res) if res["status"] in ("error", "timeout") else None)
        return res

    def cleanup(self) -> None:
        _kill_group(self.pid)  # anything the model started that outlived it (normally gone already)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _tail(path: str, lines: int = 5, limit: int = 800) -> str:
    text = _read_text(path) or ""
    keep = [ln for ln in text.splitlines() if ln.strip() and "Warning" not in ln][-lines:]
    return " | ".join(keep)[-limit:]


def run_isolated(job: Job, launcher: str = "auto", poll_s: float = 0.1) -> dict[str, Any]:
    """Run :func:`convert_one` for ``job`` in a process of its own and return its result, whatever happens.

    A crash, a kill or a hang (past ``job.timeout``) becomes an ``error`` / ``timeout`` result naming the
    step it happened in. This is what the local scheduler and Dask workers both run.
    """
    iso = IsolatedJob(job, launcher).start()
    try:
        while not iso.poll():
            time.sleep(poll_s)
        return iso.result()
    finally:
        if iso.exitcode() is None:
            iso.kill()
        iso.cleanup()

"""Shared fixtures: a private kvd per test session, ranks in subprocesses.

The package is imported from the source tree (python/) and finds
build/lib/libkv.so there; $KVD_BIN_DIR overrides where kvd and kvrun are
taken from (build/bin by default), $KVD_LIBRARY which libkv.so is loaded.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, List, Optional

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(HERE))
BIN = pathlib.Path(os.environ.get("KVD_BIN_DIR") or ROOT / "build" / "bin")

# ranks of a test share the machine's 2 cores: keep MXNet and BLAS to one thread
RANK_ENV = {"OMP_NUM_THREADS": "1", "MXNET_CPU_WORKER_NTHREADS": "1",
            "OPENBLAS_NUM_THREADS": "1"}


def pytest_report_header(config: Any) -> List[str]:
    try:
        import kvd

        return [f"kvd: {kvd.library_path()}; kvd binaries from {BIN}"]
    except Exception as e:  # noqa: BLE001
        return [f"kvd: cannot load libkv ({e})"]


def _can_connect(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


class Kvd:
    """A private kvd on a temporary socket."""

    def __init__(self, *extra: str) -> None:
        exe = BIN / "kvd"
        if not exe.exists():
            pytest.skip(f"{exe} is not built (make)")
        self.dir = tempfile.mkdtemp(prefix="kvdpy.")
        self.sock = os.path.join(self.dir, "kvd.sock")
        self.logpath = os.path.join(self.dir, "kvd.log")
        self.log = open(self.logpath, "wb")
        self.proc = subprocess.Popen([str(exe), "--socket", self.sock, "--threads", "2",
                                      *extra], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 10
        while not _can_connect(self.sock):
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"kvd did not start: {open(self.logpath).read()}")
            time.sleep(0.02)

    def stop(self) -> int:
        rc = self.proc.poll()
        if rc is None:
            self.proc.terminate()
            try:
                rc = self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        return rc


@pytest.fixture(scope="session")
def kvd_daemon():
    d = Kvd()
    yield d
    rc = d.stop()
    assert rc == 0, f"kvd exited with status {rc}"


_jobs = itertools.count()


@pytest.fixture
def job(request: Any) -> str:
    """A job name unique to this test (and this pytest process)."""
    name = request.node.name.replace("[", "-").replace("]", "").replace("/", "-")
    safe = "".join(c if c.isalnum() or c in "._-" else "-" for c in name)
    return f"py{os.getpid()}-{next(_jobs)}-{safe}"[:120]


# ---------------------------------------------------------------- ranks


def _rank_main(fn: Callable[..., Any], rank: int, n: int, sock: str, job: str, args: Any,
               q: Any) -> None:
    try:
        for k, v in RANK_ENV.items():
            os.environ.setdefault(k, v)
        res = fn(rank, n, sock, job, *args)
        q.put((rank, True, res))
    except BaseException as e:  # noqa: BLE001
        q.put((rank, False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def run_ranks(fn: Callable[..., Any], n: int, sock: str, job: str, *args: Any,
              timeout: float = 60.0) -> List[Any]:
    """Run ``fn(rank, n, sock, job, *args)`` in ``n`` spawned processes.

    Returns the ranks' results in rank order; a rank that raised fails the test
    with its traceback. ``fn`` must be importable (defined in a module).
    """
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, n, sock, job, args, q), daemon=True)
             for r in range(n)]
    for p in procs:
        p.start()
    results: dict = {}
    deadline = time.time() + timeout
    try:
        while len(results) < n:
            left = deadline - time.time()
            if left <= 0:
                raise AssertionError(f"ranks timed out after {timeout}s; done: {sorted(results)}")
            try:
                rank, ok, res = q.get(timeout=min(left, 1.0))
            except Exception:  # queue.Empty
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                missing = [r for r in range(n) if r not in results]
                if dead and all(procs[r].exitcode is not None for r in missing):
                    codes = [procs[r].exitcode for r in missing]
                    raise AssertionError(f"rank(s) {missing} died: exit codes {codes}")
                continue
            if not ok:
                raise AssertionError(f"rank {rank} failed:\n{res}")
            results[rank] = res
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(n)]


@pytest.fixture
def ranks(kvd_daemon: Kvd, job: str):
    """``ranks(fn, n, *args)``: run fn on n ranks of a fresh job on the session's kvd."""

    def go(fn: Callable[..., Any], n: int, *args: Any, timeout: float = 60.0) -> List[Any]:
        return run_ranks(fn, n, kvd_daemon.sock, job, *args, timeout=timeout)

    return go


# ---------------------------------------------------------------- kvrun


def kvrun(n: int, argv: List[str], sock: Optional[str] = None, timeout: float = 120,
          env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run ``kvrun -n N -- argv`` (on the given kvd socket) and return its result."""
    exe = BIN / "kvrun"
    if not exe.exists():
        pytest.skip(f"{exe} is not built (make)")
    e = dict(os.environ)
    e.update(RANK_ENV)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), str(HERE),
                                       e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if env:
        e.update(env)
    cmd = [str(exe), "-q", "-n", str(n), "--grace-ms", "2000"]
    if sock:
        cmd += ["--socket", sock]
    cmd += ["--", *argv]
    return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=timeout)

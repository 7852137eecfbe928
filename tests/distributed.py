"""Helpers for real multi-process tests on gloo (shared by every test module).

Two levels, as in docs/design.md:

- ``run_ranks(fn, world_size)`` starts ``world_size`` fresh processes (spawn),
  initialises a gloo process group on a free port and calls ``fn(rank, world_size,
  *args)`` in each. Return values come back per rank; a failure or a timeout in any
  rank raises with that rank's traceback, and every process is killed.
- ``run_torchrun(script, nproc)`` runs a script under the real ``torchrun``.

Every helper has a timeout and stops everything it started.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port that is free right now on loopback (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for child processes: repo on PYTHONPATH, one thread each."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def _rank_main(fn: Callable[..., Any], rank: int, world_size: int, port: int,
               args: tuple, queue: Any, init_pg: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        if init_pg:
            dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                    init_method=f"tcp://127.0.0.1:{port}")
        result = fn(rank, world_size, *args)
        queue.put((rank, True, result))
        if init_pg and dist.is_initialized():
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, False, traceback.format_exc()))


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0,
              init_pg: bool = True, expect_dead: Sequence[int] = (),
              daemon: bool = True) -> dict[int, Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes on gloo.

    ``fn`` must be importable (a module-level function). Ranks listed in
    ``expect_dead`` may die without reporting (e.g. a test that SIGKILLs itself).
    ``daemon=False`` lets a rank start processes of its own (DCP's process-mode
    ``async_save`` does); such ranks are still killed at the end like the others.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, port, args, queue, init_pg),
                         daemon=daemon) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    expected = set(range(world_size)) - set(expect_dead)
    try:
        while expected - set(results) - set(errors):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(expected - set(results) - set(errors))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout}s; "
                                   f"errors so far: {errors}")
            try:
                rank, ok, payload = queue.get(timeout=min(remaining, 0.5))
            except Exception:  # queue.Empty
                dead = [r for r in expected - set(results) - set(errors)
                        if not procs[r].is_alive() and procs[r].exitcode not in (None, 0)]
                for r in dead:
                    errors[r] = f"rank {r} died with exit code {procs[r].exitcode}"
                continue
            (results if ok else errors)[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    if errors:
        msg = "\n".join(f"--- rank {r} ---\n{e}" for r, e in sorted(errors.items()))
        raise RuntimeError(f"distributed test failed:\n{msg}")
    return results


def run_torchrun(script: str | os.PathLike, nproc: int, *script_args: str, timeout: float = 180.0,
                 env: dict[str, str] | None = None, torchrun_args: Sequence[str] = (),
                 cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """Run ``script`` under the real torchrun on a free loopback port, with a timeout.

    The whole process group is killed on timeout, so no worker outlives the test.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", *torchrun_args,
           str(script), *script_args]
    proc = subprocess.Popen(cmd, env=env or subprocess_env(), cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, _ = proc.communicate()
        raise TimeoutError(f"torchrun {script} timed out after {timeout}s:\n{out[-4000:]}")
    finally:
        kill_tree(proc.pid)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every descendant. torchrun starts workers in sessions of their
    own, so killing its process group alone can leave workers running."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=5)

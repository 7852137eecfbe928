"""The node agent: runs one real torchrun per generation on its node.

Each host (or, on one machine, each simulated node) runs one agent. It registers with
the coordinator, then for every generation it is a member of, it starts torchrun with the
generation's rendezvous and watches it: it heartbeats, stops the workers when the
coordinator asks (SIGTERM to the whole process group, SIGKILL after a grace period, so a
rank stuck inside a collective cannot block the restart), and reports how the generation
ended, with the workers' exit codes parsed from torchrun's failure summary (exit codes are
known only to the parent: the detector sees a crash only as a lost connection).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from trainkit import rundir
from trainkit.run.control import AGG_SECRET_KEY, Control
from trainkit.run.pool import GoPlan, pool_key, write_go
from trainkit.run.torchrun_args import TorchrunArgs, generation_command, warm_start_supported

_EXITCODE = re.compile(r"exitcode\s*:\s*(-?\d+)")
HEARTBEAT_S = 1.0


class _Sink:
    """Where a torchrun's output goes: a warm pool's log moves to the generation's log
    directory when the pool is given a generation."""

    def __init__(self, path: Path) -> None:
        self.path = path


def _stream(proc: subprocess.Popen, prefix: str, sink: _Sink, codes: list[int],
            tee: threading.Event) -> None:
    """Copy torchrun's output to its log file, and to our stdout while ``tee`` is set;
    collect worker exit codes."""
    assert proc.stdout is not None
    path, log = sink.path, open(sink.path, "a", encoding="utf-8", errors="replace")
    try:
        for line in proc.stdout:
            if sink.path != path:
                log.close()
                path, log = sink.path, open(sink.path, "a", encoding="utf-8", errors="replace")
            log.write(line)
            log.flush()
            if tee.is_set():
                sys.stdout.write(f"{prefix}{line}")
                sys.stdout.flush()
            m = _EXITCODE.search(line)
            if m:
                codes.append(int(m.group(1)))
    finally:
        log.close()


def _sigterm_tree(proc: subprocess.Popen) -> list:
    """SIGTERM to torchrun's process group and to every worker under it, at once rather
    than after torchrun's own shutdown gets to them: the workers are what a restart
    waits for (their memory, their GPU). Returns the workers (psutil processes)."""
    import psutil

    try:
        tree = [*psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    for p in tree:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    return tree


def _kill_all(procs: list) -> None:
    import psutil

    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def terminate_tree(proc: subprocess.Popen, grace: float) -> None:
    """Stop torchrun and every worker under it.

    SIGTERM first, so torchrun can shut its workers down and exit cleanly; after
    ``grace`` seconds, SIGKILL to every descendant. torchrun starts workers in sessions
    of their own, so signalling its process group alone could leave a hung worker alive.
    """
    tree = _sigterm_tree(proc)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    _kill_all(tree)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def stop_workers(proc: subprocess.Popen, grace: float) -> float:
    """Stop a generation's workers now and return when they are gone (seconds taken).

    SIGTERM to torchrun and to every worker at once, SIGKILL to the workers still alive
    after ``grace``. torchrun itself is not waited for: with torch loaded, its shutdown
    (traceback, interpreter teardown) took 2-5 s on a busy machine, and a restart needs
    only the workers gone; the caller reaps torchrun afterwards.
    """
    import psutil

    t0 = time.monotonic()
    _, alive = psutil.wait_procs(_sigterm_tree(proc), timeout=grace)
    _kill_all(alive)
    psutil.wait_procs(alive, timeout=grace)
    return time.monotonic() - t0


# A warm pool starts this long after the current generation, so its imports do not
# compete for the CPU with the current generation's own start-up.
WARM_DELAY_S = 3.0


@dataclass
class _Launch:
    """One torchrun started by this agent: a generation, or a warm pool waiting for one."""

    gen: int | None          # None: a pool not given a generation yet
    proc: subprocess.Popen
    reader: threading.Thread
    codes: list[int]
    go: Path | None          # a pool's go file (:mod:`trainkit.run.pool`)
    tee: threading.Event     # set while its output is also streamed to the console
    sink: _Sink
    seq: int = -1            # a pool's sequence number on this node


class NodeAgent:
    """One node's agent. ``run()`` returns the process exit code for this node."""

    def __init__(self, control: Control, node_id: str, args: TorchrunArgs, *, run_dir: Path,
                 endpoint: str, stop_grace: float = 5.0, quiet: bool = False,
                 tee: bool = False) -> None:
        self.control = control
        self.node_id = node_id
        self.args = args
        self.run_dir = run_dir
        self.endpoint = endpoint
        self.stop_grace = stop_grace
        self.prefix = "" if quiet else f"[{node_id}] "
        self.tee = tee     # --tee: stream torchrun's and the workers' output too
        self._stop_heartbeat = threading.Event()
        # The node's memory tier: checkpoints in /dev/shm that outlive a crashed worker,
        # owned by this agent across generations and freed when it leaves.
        digest = hashlib.sha1(f"{run_dir.resolve()}|{node_id}".encode()).hexdigest()[:16]
        base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        self.memory_dir = Path(base) / f"trainkit-{os.getuid()}" / f"run-{digest}"
        self._pool: _Launch | None = None
        self._pool_seq = 0
        self._reapers: list[threading.Thread] = []   # torchruns of stopped generations

    def _note(self, text: str) -> None:
        """An agent remark the coordinator's events already tell: to the console only
        with ``--tee`` (another process's line would tear the live status line), always
        to ``logs/agents.log``."""
        line = f"{self.prefix}[trainkit agent] {text}"
        if self.tee:
            print(line, file=sys.stderr, flush=True)
        try:
            (self.run_dir / rundir.LOGS_DIR).mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / rundir.LOGS_DIR / "agents.log", "a") as log:
                log.write(f"{time.strftime('%H:%M:%S')} {line}\n")
        except OSError:
            pass

    def _heartbeat(self) -> None:
        while not self._stop_heartbeat.wait(HEARTBEAT_S):
            try:
                self.control.put(f"tk/hb/{self.node_id}", time.time())
            except Exception:  # noqa: BLE001 - coordinator gone; the main loop notices
                return

    def run(self) -> int:
        self.control.register(self.node_id, {"host": socket.gethostname(), "pid": os.getpid()})
        self.control.put(f"tk/hb/{self.node_id}", time.time())
        threading.Thread(target=self._heartbeat, name="trainkit-agent-hb", daemon=True).start()
        try:
            gen = 0
            while True:
                plan = self.control.wait(f"tk/gen/{gen}/plan", timeout=3600, also="tk/final")
                if plan is None:
                    final = self.control.get("tk/final") or {}
                    self.control.put(f"tk/bye/{self.node_id}", time.time())
                    return 0 if final.get("status") == "done" else 1
                if self.node_id not in plan["members"]:
                    self.control.put(f"tk/left/{self.node_id}", {"gen": gen, "time": time.time()})
                    self._note(f"excluded from generation {gen}: leaving")
                    return 0
                self._run_generation(gen, plan)
                gen += 1
        except (RuntimeError, ConnectionError, OSError) as exc:
            print(f"{self.prefix}[trainkit agent] lost the coordinator ({exc}); exiting",
                  file=sys.stderr, flush=True)
            return 1
        finally:
            self._stop_heartbeat.set()
            self._drop_pool()
            for reaper in self._reapers:
                reaper.join(timeout=2 * self.stop_grace)
            shutil.rmtree(self.memory_dir, ignore_errors=True)

    def _base_env(self, plan: dict) -> dict[str, str]:
        """What every torchrun of this node gets, pools included: nothing that depends on
        the generation or its members."""
        env = dict(os.environ)
        env.update({
            rundir.RUN_DIR_ENV: str(self.run_dir),
            rundir.NODE_ENV: self.node_id,
            rundir.HOSTNAME_ENV: self.node_id,
            rundir.MEMORY_DIR_ENV: str(self.memory_dir),
        })
        if plan.get("aggregator"):
            env[rundir.AGGREGATOR_ENV] = plan["aggregator"]
            if not env.get(rundir.AGG_SECRET_ENV):   # an agent on another host than the launcher
                env[rundir.AGG_SECRET_ENV] = self.control.get(AGG_SECRET_KEY) or ""
        return env

    def _gen_env(self, gen: int, plan: dict) -> dict[str, str]:
        """What a generation adds: a cold torchrun's environment, or a warm pool's go file."""
        env = {rundir.NODE_INDEX_ENV: str(plan["index"][self.node_id]),
               rundir.GENERATION_ENV: str(gen)}
        env.update(plan.get("env") or {})   # --traffic-plan: NCCL settings and TRAINKIT_PLAN
        if plan.get("restore_before") is not None:    # the coordinator's restart-loop guard
            env[rundir.RESTORE_BEFORE_ENV] = str(plan["restore_before"])
        if not plan.get("monitor", True):
            env[rundir.AUTO_MONITOR_ENV] = "0"
        return env

    def _launch(self, cmd: list[str], env: dict[str, str], log_path: Path, *, gen: int | None,
                go: Path | None) -> _Launch:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        codes: list[int] = []
        tee = threading.Event()
        if self.tee and go is None:    # a pool is streamed once it runs a generation
            tee.set()
        sink = _Sink(log_path)
        reader = threading.Thread(target=_stream, daemon=True,
                                  args=(proc, self.prefix, sink, codes, tee))
        reader.start()
        return _Launch(gen, proc, reader, codes, go, tee, sink)

    def _gen_log(self, gen: int) -> Path:
        return self.run_dir / rundir.LOGS_DIR / f"gen{gen}" / f"{self.node_id}.log"

    def _start_pool(self, plan: dict) -> _Launch:
        """A one-node torchrun whose workers import and wait for a go file
        (:mod:`trainkit.run.pool`); the coordinator learns its state from ``tk/pool/<node>``."""
        seq, self._pool_seq = self._pool_seq, self._pool_seq + 1
        go_dir = Path(tempfile.mkdtemp(prefix=f"trainkit-pool-{self.node_id}-"))
        env = self._base_env(plan)
        env[rundir.WARM_GO_ENV] = str(go_dir / "go")
        cmd = generation_command(sys.executable, self.args, nnodes=1, endpoint=self.endpoint,
                                 rdzv_id=f"{plan['pool']['rdzv_id']}-{self.node_id}-{seq}",
                                 rdzv_conf=plan.get("rdzv_conf", ""))
        log = self.run_dir / rundir.LOGS_DIR / "pool" / f"{self.node_id}.{seq}.log"
        launch = self._launch(cmd, env, log, gen=None, go=go_dir / "go")
        launch.seq = seq
        self.control.put(pool_key(self.node_id), {"seq": seq, "state": "started",
                                                  "time": time.time()})
        threading.Thread(target=self._watch_pool, args=(launch,), daemon=True,
                         name="trainkit-agent-pool").start()
        return launch

    def _watch_pool(self, w: _Launch) -> None:
        """Tell the coordinator when every local worker of the pool waits for go
        (``ready``), or that the pool died before it was given a generation (``failed``)."""
        assert w.go is not None
        ready = False
        try:
            while w.proc.poll() is None:
                if w.go.exists():
                    return
                if not ready and len(list(w.go.parent.glob("go.ready.*"))) >= \
                        self.args.nproc_per_node:
                    ready = True
                    self.control.put(pool_key(self.node_id), {"seq": w.seq, "state": "ready",
                                                              "time": time.time()})
                time.sleep(0.05)
            if not w.go.exists():
                self.control.put(pool_key(self.node_id), {"seq": w.seq, "state": "failed",
                                                          "rc": w.proc.returncode,
                                                          "time": time.time()})
        except Exception:  # noqa: BLE001 - coordinator gone; the main loop notices
            return

    def _drop_pool(self) -> None:
        w, self._pool = self._pool, None
        if w is not None:
            terminate_tree(w.proc, 1.0)
            w.reader.join(timeout=2)
            if w.go is not None:
                shutil.rmtree(w.go.parent, ignore_errors=True)

    def _warm_launch(self, gen: int, plan: dict) -> _Launch:
        """Give this node's pool generation ``gen``: write its go file. A pool that died
        since the coordinator saw it ready is replaced by a fresh one, told to go at once
        (slower, but it joins the same per-generation store as the other members)."""
        warm = plan["warm"]
        w = self._pool
        if w is not None and w.seq == warm["pools"].get(self.node_id) and w.proc.poll() is None:
            self._pool = None
            self._note(f"generation {gen}: warm start (pool {w.seq})")
        else:
            self._drop_pool()
            w = self._start_pool(plan)
            self._note(f"generation {gen}: the ready pool is gone; a fresh one joins instead")
        w.gen = gen
        log = self._gen_log(gen)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as f:    # the generation's log exists from go on
            f.write(f"[trainkit agent] generation {gen} runs on warm pool {w.seq} (its output "
                    f"before go: {rundir.LOGS_DIR}/pool/{self.node_id}.{w.seq}.log)\n")
        w.sink.path = log
        if self.tee:
            w.tee.set()
        assert w.go is not None
        write_go(w.go, GoPlan(node_rank=plan["members"].index(self.node_id),
                              nnodes=len(plan["members"]), master_addr=warm["master_addr"],
                              master_port=int(warm["master_port"]), run_id=warm["run_id"],
                              env=self._gen_env(gen, plan)))
        return w

    def _run_generation(self, gen: int, plan: dict) -> None:
        if plan.get("warm"):
            launch = self._warm_launch(gen, plan)
        else:
            cmd = generation_command(sys.executable, self.args, nnodes=len(plan["members"]),
                                     endpoint=self.endpoint, rdzv_id=plan["rdzv_id"],
                                     rdzv_conf=plan.get("rdzv_conf", ""))
            launch = self._launch(cmd, {**self._base_env(plan), **self._gen_env(gen, plan)},
                                  self._gen_log(gen), gen=gen, go=None)
        pools = bool(plan.get("pool")) and warm_start_supported(self.args)
        proc = launch.proc
        stopped = False
        pool_at = time.monotonic() + WARM_DELAY_S
        while proc.poll() is None:
            if (self.control.get(f"tk/gen/{gen}/stop") is not None
                    or self.control.get("tk/final") is not None):
                stopped = True
                # Stopped on purpose: torchrun's SignalException traceback and the
                # workers' goodbyes go to the log only, never to the console.
                launch.tee.clear()
                took = stop_workers(proc, self.stop_grace)
                reaper = threading.Thread(target=self._reap, args=(launch, took), daemon=True,
                                          name="trainkit-agent-reap")
                reaper.start()
                self._reapers.append(reaper)
                break
            if pools and time.monotonic() > pool_at and (
                    self._pool is None or self._pool.proc.poll() is not None):
                pool_at = float("inf")      # at most one (re)start per generation
                self._drop_pool()
                self._pool = self._start_pool(plan)
            time.sleep(0.05)
        if not stopped:
            launch.reader.join(timeout=5)
        if launch.go is not None:
            shutil.rmtree(launch.go.parent, ignore_errors=True)
        self.control.put(f"tk/gen/{gen}/exit/{self.node_id}",
                         {"rc": proc.poll(), "stopped": stopped, "exitcodes": launch.codes,
                          "time": time.time()})

    def _reap(self, launch: _Launch, workers_s: float) -> None:
        """After a stop: wait for torchrun's own shutdown (SIGKILL after the grace)."""
        t0 = time.monotonic()
        try:
            launch.proc.wait(timeout=self.stop_grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(launch.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            launch.proc.wait()
        launch.reader.join(timeout=5)
        self._note(f"generation {launch.gen} stopped: workers gone {workers_s:.2f} s after the "
                   f"stop, torchrun {workers_s + time.monotonic() - t0:.2f} s after")

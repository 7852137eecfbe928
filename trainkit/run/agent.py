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
from trainkit.run.torchrun_args import TorchrunArgs, generation_command, warm_start_supported

_EXITCODE = re.compile(r"exitcode\s*:\s*(-?\d+)")
HEARTBEAT_S = 1.0


def _stream(proc: subprocess.Popen, prefix: str, log_path: Path, codes: list[int],
            tee: threading.Event) -> None:
    """Copy torchrun's output to its log file, and to our stdout while ``tee`` is set;
    collect worker exit codes."""
    assert proc.stdout is not None
    with open(log_path, "a", encoding="utf-8", errors="replace") as log:
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if tee.is_set():
                sys.stdout.write(f"{prefix}{line}")
                sys.stdout.flush()
            m = _EXITCODE.search(line)
            if m:
                codes.append(int(m.group(1)))


def terminate_tree(proc: subprocess.Popen, grace: float) -> None:
    """Stop torchrun and every worker under it.

    SIGTERM first, so torchrun can shut its workers down and exit cleanly; after
    ``grace`` seconds, SIGKILL to every descendant. torchrun starts workers in sessions
    of their own, so signalling its process group alone could leave a hung worker alive.
    """
    import psutil

    try:
        tree = [*psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# A warm generation starts this long after the current one, so its imports do not
# compete for the CPU with the current generation's own start-up.
WARM_DELAY_S = 3.0


@dataclass
class _Launch:
    """One torchrun generation started by this agent."""

    gen: int
    proc: subprocess.Popen
    reader: threading.Thread
    codes: list[int]
    go: Path | None          # a warm generation's go file
    tee: threading.Event     # set while its output is also streamed to the console


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
        self._warm: _Launch | None = None

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
            self._drop_warm()
            shutil.rmtree(self.memory_dir, ignore_errors=True)

    def _env(self, gen: int, plan: dict) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            rundir.RUN_DIR_ENV: str(self.run_dir),
            rundir.NODE_ENV: self.node_id,
            rundir.HOSTNAME_ENV: self.node_id,
            rundir.NODE_INDEX_ENV: str(plan["index"][self.node_id]),
            rundir.GENERATION_ENV: str(gen),
            rundir.MEMORY_DIR_ENV: str(self.memory_dir),
        })
        if plan.get("aggregator"):
            env[rundir.AGGREGATOR_ENV] = plan["aggregator"]
            if not env.get(rundir.AGG_SECRET_ENV):   # an agent on another host than the launcher
                env[rundir.AGG_SECRET_ENV] = self.control.get(AGG_SECRET_KEY) or ""
        env.update(plan.get("env") or {})   # --traffic-plan: NCCL settings and TRAINKIT_PLAN
        if plan.get("restore_before") is not None:    # the coordinator's restart-loop guard
            env[rundir.RESTORE_BEFORE_ENV] = str(plan["restore_before"])
        if not plan.get("monitor", True):
            env[rundir.AUTO_MONITOR_ENV] = "0"
        return env

    def _launch(self, gen: int, plan: dict, rdzv_id: str, *, warm_go: Path | None) -> _Launch:
        env = self._env(gen, plan)
        if warm_go is not None:
            env[rundir.WARM_GO_ENV] = str(warm_go)
        cmd = generation_command(sys.executable, self.args, nnodes=len(plan["members"]),
                                 endpoint=self.endpoint, rdzv_id=rdzv_id,
                                 rdzv_conf=plan.get("rdzv_conf", ""), warm=warm_go is not None)
        log_dir = self.run_dir / rundir.LOGS_DIR / f"gen{gen}"
        log_dir.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        codes: list[int] = []
        tee = threading.Event()
        if self.tee and warm_go is None:    # a warm generation is streamed once it runs
            tee.set()
        reader = threading.Thread(target=_stream, daemon=True,
                                  args=(proc, self.prefix, log_dir / f"{self.node_id}.log",
                                        codes, tee))
        reader.start()
        return _Launch(gen, proc, reader, codes, warm_go, tee)

    def _start_warm(self, gen: int, plan: dict) -> None:
        """Pre-start generation ``gen`` with this generation's members (module docstring
        of :mod:`trainkit.run.warm`)."""
        warm = plan.get("warm")
        if not warm or not warm_start_supported(self.args):
            return
        go_dir = Path(tempfile.mkdtemp(prefix=f"trainkit-warm-{self.node_id}-"))
        self._warm = launch = self._launch(gen, plan, warm["rdzv_id"], warm_go=go_dir / "go")
        self.control.put(f"tk/gen/{gen}/warm_started/{self.node_id}", time.time())
        threading.Thread(target=self._watch_warm, args=(launch,), daemon=True,
                         name="trainkit-agent-warm").start()

    def _watch_warm(self, w: _Launch) -> None:
        """Tell the coordinator when every local worker of the warm generation waits for
        go (``warm_ready``), or that the warm generation died first (``warm_failed``)."""
        assert w.go is not None
        try:
            while w.proc.poll() is None:
                if len(list(w.go.parent.glob("go.ready.*"))) >= self.args.nproc_per_node:
                    self.control.put(f"tk/gen/{w.gen}/warm_ready/{self.node_id}", time.time())
                    return
                time.sleep(0.05)
            self.control.put(f"tk/gen/{w.gen}/warm_failed/{self.node_id}",
                             {"rc": w.proc.returncode, "time": time.time()})
        except Exception:  # noqa: BLE001 - coordinator gone; the main loop notices
            return

    def _drop_warm(self) -> None:
        w, self._warm = self._warm, None
        if w is not None:
            terminate_tree(w.proc, 1.0)
            w.reader.join(timeout=2)
            if w.go is not None:
                shutil.rmtree(w.go.parent, ignore_errors=True)

    def _run_generation(self, gen: int, plan: dict) -> None:
        w = self._warm
        if (plan.get("use_warm") and w is not None and w.gen == gen
                and w.proc.poll() is None and w.go is not None):
            self._warm = None
            if self.tee:
                w.tee.set()
            w.go.touch()                     # the warm workers run the script now
            launch = w
            self._note(f"generation {gen}: warm start")
        else:
            self._drop_warm()
            launch = self._launch(gen, plan, plan["rdzv_id"], warm_go=None)
        proc = launch.proc
        stopped = False
        stop_at = 0.0
        warm_at = time.monotonic() + WARM_DELAY_S
        while proc.poll() is None:
            if (self.control.get(f"tk/gen/{gen}/stop") is not None
                    or self.control.get("tk/final") is not None):
                stopped = True
                # Stopped on purpose: torchrun's SignalException traceback and the
                # workers' goodbyes go to the log only, never to the console.
                launch.tee.clear()
                stop_at = time.monotonic()
                terminate_tree(proc, self.stop_grace)
                break
            if self._warm is None and time.monotonic() > warm_at:
                warm_at = float("inf")
                self._start_warm(gen + 1, plan)
            time.sleep(0.1)
        exited_at = time.monotonic()
        launch.reader.join(timeout=5)
        if stopped:
            self._note(f"generation {gen} stopped: torchrun gone {exited_at - stop_at:.2f} s "
                       f"after the stop, its output closed {time.monotonic() - stop_at:.2f} s "
                       f"after")
        if launch.go is not None:
            shutil.rmtree(launch.go.parent, ignore_errors=True)
        self.control.put(f"tk/gen/{gen}/exit/{self.node_id}",
                         {"rc": proc.returncode, "stopped": stopped, "exitcodes": launch.codes,
                          "time": time.time()})

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
from pathlib import Path

from trainkit.run.control import Control
from trainkit.run.torchrun_args import TorchrunArgs, generation_command

_EXITCODE = re.compile(r"exitcode\s*:\s*(-?\d+)")
HEARTBEAT_S = 1.0


def _stream(proc: subprocess.Popen, prefix: str, log_path: Path, codes: list[int]) -> None:
    """Copy torchrun's output to our stdout and a log file; collect worker exit codes."""
    assert proc.stdout is not None
    with open(log_path, "a", encoding="utf-8", errors="replace") as log:
        for line in proc.stdout:
            log.write(line)
            log.flush()
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


class NodeAgent:
    """One node's agent. ``run()`` returns the process exit code for this node."""

    def __init__(self, control: Control, node_id: str, args: TorchrunArgs, *, run_dir: Path,
                 endpoint: str, stop_grace: float = 5.0, quiet: bool = False) -> None:
        self.control = control
        self.node_id = node_id
        self.args = args
        self.run_dir = run_dir
        self.endpoint = endpoint
        self.stop_grace = stop_grace
        self.prefix = "" if quiet else f"[{node_id}] "
        self._stop_heartbeat = threading.Event()
        # The node's memory tier: checkpoints in /dev/shm that outlive a crashed worker,
        # owned by this agent across generations and freed when it leaves.
        digest = hashlib.sha1(f"{run_dir.resolve()}|{node_id}".encode()).hexdigest()[:16]
        base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        self.memory_dir = Path(base) / f"trainkit-{os.getuid()}" / f"run-{digest}"

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
                    print(f"{self.prefix}[trainkit agent] excluded from generation {gen}: "
                          f"leaving", file=sys.stderr, flush=True)
                    return 0
                self._run_generation(gen, plan)
                gen += 1
        except (RuntimeError, ConnectionError, OSError) as exc:
            print(f"{self.prefix}[trainkit agent] lost the coordinator ({exc}); exiting",
                  file=sys.stderr, flush=True)
            return 1
        finally:
            self._stop_heartbeat.set()
            shutil.rmtree(self.memory_dir, ignore_errors=True)

    def _run_generation(self, gen: int, plan: dict) -> None:
        env = dict(os.environ)
        env.update({
            "TRAINKIT_RUN_DIR": str(self.run_dir),
            "TRAINKIT_NODE": self.node_id,
            "TRAINKIT_HOSTNAME": self.node_id,
            "TRAINKIT_NODE_INDEX": str(plan["index"][self.node_id]),
            "TRAINKIT_GENERATION": str(gen),
            "TRAINKIT_MEMORY_DIR": str(self.memory_dir),
        })
        if plan.get("aggregator"):
            env["TRAINKIT_AGGREGATOR"] = plan["aggregator"]
        cmd = generation_command(sys.executable, self.args, nnodes=len(plan["members"]),
                                 endpoint=self.endpoint, rdzv_id=plan["rdzv_id"],
                                 rdzv_conf=plan.get("rdzv_conf", ""))
        log_dir = self.run_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        codes: list[int] = []
        reader = threading.Thread(target=_stream, daemon=True,
                                  args=(proc, self.prefix, log_dir / f"{self.node_id}.gen{gen}.log",
                                        codes))
        reader.start()
        stopped = False
        while proc.poll() is None:
            if (self.control.get(f"tk/gen/{gen}/stop") is not None
                    or self.control.get("tk/final") is not None):
                stopped = True
                terminate_tree(proc, self.stop_grace)
                break
            time.sleep(0.1)
        reader.join(timeout=5)
        self.control.put(f"tk/gen/{gen}/exit/{self.node_id}",
                         {"rc": proc.returncode, "stopped": stopped, "exitcodes": codes,
                          "time": time.time()})

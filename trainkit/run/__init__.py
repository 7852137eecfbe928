"""``trainkit run``: a torchrun wrapper that detects, isolates, restarts and resumes.

See ``launcher`` for the modes, ``coordinator`` for the generation loop, ``agent`` for
what runs on each node, ``pool`` and ``warm`` for the warm pools that take a restart
whatever its membership, and ``policy`` for the decisions.
"""

from trainkit.run.launcher import RunOptions, run_job
from trainkit.run.policy import Decision, Fault, PolicyConfig, PolicyState, decide

__all__ = ["Decision", "Fault", "PolicyConfig", "PolicyState", "RunOptions", "decide", "run_job"]

"""Exact, streamed model merging: TIES and its family (``trainkit merge``).

Example::

    from trainkit.merge import ties_merge
    merged = ties_merge(base, [ft_a, ft_b, ft_c], density=0.2, lam=1.0, scope="global")
"""

from trainkit.merge.api import merge, ties_merge
from trainkit.merge.engine import DictSink, MergeStats, TensorSink, run_merge
from trainkit.merge.methods import METHODS, MergeConfig, MergeMethod, make_config
from trainkit.merge.plan import MergeInputError, MergePlan, TensorTask, plan_merge

__all__ = [
    "ties_merge",
    "merge",
    "METHODS",
    "MergeConfig",
    "MergeMethod",
    "make_config",
    "MergeInputError",
    "MergePlan",
    "TensorTask",
    "plan_merge",
    "run_merge",
    "DictSink",
    "MergeStats",
    "TensorSink",
]

"""Exact, streamed model merging: TIES and its family (``trainkit merge``).

Example::

    from trainkit.merge import ties_merge
    merged = ties_merge(base, [ft_a, ft_b, ft_c], density=0.2, lam=1.0, scope="global")

Names are resolved on first use, so ``trainkit merge --help`` (which needs only
``METHODS``) does not import torch.
"""

from __future__ import annotations

from trainkit._lazy import lazy_getattr

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

_WHERE = {
    "ties_merge": "api",
    "merge": "api",
    "METHODS": "methods",
    "MergeConfig": "methods",
    "MergeMethod": "methods",
    "make_config": "methods",
    "MergeInputError": "plan",
    "MergePlan": "plan",
    "TensorTask": "plan",
    "plan_merge": "plan",
    "run_merge": "engine",
    "DictSink": "engine",
    "MergeStats": "engine",
    "TensorSink": "engine",
}

__getattr__ = lazy_getattr(__name__, {k: f"trainkit.merge.{v}" for k, v in _WHERE.items()}, globals())


def __dir__() -> list[str]:
    return sorted(__all__)

"""Where the merge arithmetic runs (``trainkit merge --device cpu|cuda|auto``).

On CUDA each tensor's operands are copied to the GPU as they are read, merged
there, and the result copied back to be written, so GPU memory holds only the
tensors in flight. The arithmetic is the same sequence of elementwise torch ops
on either device; the one reduction that can differ in rounding is a float32
sum (the L1 norms of ``dare_ties`` under compat), so CPU and CUDA outputs are
equal except there, where they differ by float32 rounding of that norm ratio.
"""

from __future__ import annotations

__all__ = ["resolve_device"]


def resolve_device(name: str) -> str:
    """``"cpu"``, ``"cuda"`` or ``"auto"`` -> the device to use; a missing GPU is a ValueError."""
    import torch

    if name == "cpu":
        return "cpu"
    available = torch.cuda.is_available()
    if name == "auto":
        return "cuda" if available else "cpu"
    if name == "cuda":
        if not available:
            why = ("this torch is built without CUDA" if torch.version.cuda is None
                   else "no CUDA device is visible (check CUDA_VISIBLE_DEVICES and the driver)")
            raise ValueError(f"--device cuda: CUDA is not available: {why}; use --device cpu or auto")
        return "cuda"
    raise ValueError(f"device must be cpu, cuda or auto, got {name!r}")

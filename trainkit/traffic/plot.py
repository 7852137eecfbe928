"""Link-load picture for ``trainkit plan compare --plot``.

One row per planner, two heatmaps each (leaf->spine and spine->leaf cables),
coloured by the cable's seconds in the busiest phase divided by the optimum, so
hot spots from hash collisions stand out against a flat optimal plan.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trainkit.traffic.plan import Plan

__all__ = ["plot_loads"]


def _busiest(p: Plan) -> tuple[np.ndarray, np.ndarray]:
    cap = p.topology.link_gbps() * 1e9 / 8
    ph = max(p.phases, key=lambda x: x.fabric_time)
    with np.errstate(divide="ignore", invalid="ignore"):
        up = np.where(cap > 0, ph.up_bytes / cap, np.nan)
        down = np.where(cap > 0, ph.down_bytes / cap, np.nan)
    L = p.topology.leaves
    return up.reshape(L, -1), down.reshape(L, -1)


def plot_loads(plans: dict[str, Plan], optimum: float, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(plans), 2, figsize=(10, 2.6 * len(plans)), squeeze=False)
    vmax = max(np.nanmax(np.concatenate([m.ravel() for m in _busiest(p)])) for p in plans.values()) / optimum
    for row, (name, p) in enumerate(plans.items()):
        for col, (title, grid) in enumerate(zip(("leaf -> spine", "spine -> leaf"), _busiest(p))):
            ax = axes[row][col]
            im = ax.imshow(grid / optimum, aspect="auto", cmap="inferno", vmin=0, vmax=max(vmax, 1.0))
            ax.set_title(f"{name}: {title} (max {np.nanmax(grid) / optimum:.2f}x opt)", fontsize=9)
            ax.set_xlabel("spine x parallel cable")
            ax.set_ylabel("leaf")
            fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

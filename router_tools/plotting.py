"""The accuracy-vs-escalation curve as a PNG (matplotlib, Agg backend: no display needed).

Needs the ``plot`` extra (matplotlib); :class:`PlotError` says so when it is missing. Commands
call :func:`require_matplotlib` before they write anything, so a missing extra never leaves half
of their outputs behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from router_tools.thresholds import Sweep
from router.errors import RouterError


class PlotError(RouterError):
    pass


INSTALL_HINT = "pip install 'hybrid-edge-router-tools[plot]'"


def require_matplotlib():
    """``matplotlib.pyplot`` on the Agg backend (no display needed), or :class:`PlotError` naming the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError as exc:
        why = "is not installed" if getattr(exc, "name", None) == "matplotlib" else f"cannot be imported ({exc})"
        raise PlotError(f"plots need matplotlib, which {why}: {INSTALL_HINT}") from None
    return plt


def plot_curve(s: Sweep, path: str | Path, *, title: str = "Accuracy vs escalation",
               chosen: Optional[tuple[float, float, str]] = None,
               points: Sequence[tuple[float, float, str]] = ()) -> Path:
    """Draw the sweep's curve; mark edge-only, cloud-only, ``chosen`` and extra ``points``.

    Points are ``(escalation in [0, 1], accuracy in [0, 1], label)``.
    """
    plt = require_matplotlib()
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7.0, 4.6), dpi=110)
    try:
        ax.plot(s.escalation * 100, s.accuracy * 100, drawstyle="steps-post", lw=1.6, color="#1f77b4",
                label="router (threshold sweep)")
        ax.scatter([0], [s.edge_accuracy * 100], s=60, marker="o", color="#ff7f0e", zorder=3,
                   label=f"edge only ({s.edge_accuracy:.2%})")
        ax.scatter([100], [s.cloud_accuracy * 100], s=60, marker="s", color="#2ca02c", zorder=3,
                   label=f"cloud only ({s.cloud_accuracy:.2%})")
        ax.axhline(s.cloud_accuracy * 100, color="#2ca02c", lw=0.8, ls=":")
        if chosen is not None:
            e, a, label = chosen
            ax.scatter([e * 100], [a * 100], s=140, marker="*", color="#d62728", zorder=4,
                       label=f"{label}: {e:.1%} escalated, {a:.2%}")
        for (e, a, label), marker, color in zip(points, "Dv^P", ("#9467bd", "#8c564b", "#e377c2", "#7f7f7f")):
            # hollow, so a chosen/predicted point underneath stays visible
            ax.scatter([e * 100], [a * 100], s=150, marker=marker, zorder=5, facecolors="none", edgecolors=color,
                       linewidths=1.8, label=f"{label}: {e:.1%}, {a:.2%}")
        lo = min(s.accuracy.min(), s.edge_accuracy) * 100
        hi = max(s.accuracy.max(), s.cloud_accuracy) * 100
        pad = max(0.5, (hi - lo) * 0.08)
        ax.set_ylim(lo - pad, min(100.0, hi + pad))
        ax.set_xlim(-2, 102)
        ax.set_xlabel("requests escalated to the cloud (%)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{title} (n={s.n})")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=8, framealpha=0.85)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path

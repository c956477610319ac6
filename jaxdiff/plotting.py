"""Small plotting helpers (matplotlib, headless) used by the CLI and benchmarks."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def scatter_png(samples: Any, reference: Any, path: str | Path, title: str = "") -> Path:
    """Scatter of 2-D samples beside exact reference samples, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples, reference = np.asarray(samples), np.asarray(reference)
    lim = float(np.percentile(np.abs(reference), 99.5)) * 1.3
    fig, axes = plt.subplots(1, 2, figsize=(8, 4), sharex=True, sharey=True)
    for ax, pts, name in ((axes[0], samples, "jaxdiff samples"), (axes[1], reference, "exact samples")):
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
        ax.set_title(name)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

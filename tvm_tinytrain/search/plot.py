"""The measured gains as a figure: bias gain per K, and weight gain per (layer, ratio), the pick marked."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..files import replacing_file


def plot_gains(result, path: str | Path, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 2.2]})
    ks = sorted(result.bias_gain)
    left.plot(ks, [100 * result.bias_gain[k] for k in ks], "o-", color="tab:blue")
    picked_k = (result.scheme.get("bias") or {}).get("last", 0)
    if picked_k in result.bias_gain:
        left.plot([picked_k], [100 * result.bias_gain[picked_k]], "*", ms=16, color="tab:red", label="picked")
        left.legend()
    left.set_xlabel("biases of the last K layers")
    left.set_ylabel("validation accuracy gain over the classifier alone (points)")
    left.grid(alpha=0.3)

    layers = sorted({i for i, _ in result.weight_gain})
    ratios = sorted({r for _, r in result.weight_gain})
    grid = np.full((len(ratios), max(len(layers), 1)), np.nan)
    for (i, r), g in result.weight_gain.items():
        grid[ratios.index(r), layers.index(i)] = 100 * g
    bound = np.nanmax(np.abs(grid)) if np.isfinite(grid).any() else 1.0
    image = right.imshow(grid, aspect="auto", cmap="RdBu", vmin=-bound, vmax=bound)
    fig.colorbar(image, ax=right, label="gain over bias-only (points)")
    right.set_xticks(range(len(layers)), [str(i) for i in layers], fontsize=7)
    right.set_yticks(range(len(ratios)), [f"{r:g}" for r in ratios])
    right.set_xlabel("layer (weights trained; blank: over the budget)")
    right.set_ylabel("ratio of output channels")
    for key, r in (result.scheme.get("weights") or {}).items():
        if int(key) in layers and r in ratios:
            right.plot(layers.index(int(key)), ratios.index(r), "*", ms=14, color="black")
    fig.suptitle(title or f"contribution analysis; picked {result.planned_sram_bytes / 1024:.1f} KB planned "
                 f"of {result.budget_bytes / 1024:.0f} KB (stars)")
    fig.tight_layout()
    with replacing_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)

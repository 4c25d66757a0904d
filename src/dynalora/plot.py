"""Pictures people would rather look at than read: blend weights over the tokens of a stream."""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def pyplot(path: str | Path):
    """``matplotlib.pyplot`` (headless), or None with a warning naming ``path`` when matplotlib is not installed:
    plots are an extra (``pip install dynalora[plot]``), and what draws them goes on without."""
    try:
        import matplotlib
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'dynalora[plot]'): %s not drawn", path)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_blend_timeline(blends: list[list[float]], labels: list[str], starts: list[int], domains: list[str],
                        fired: list[int], path: str | Path) -> Path | None:
    """Stacked blend weights per token, segment boundaries (labelled with their domain) and trigger marks."""
    plt = pyplot(path)
    if plt is None:
        return None
    import numpy as np

    weights = np.clip(np.array(blends, dtype=float), 0, None)  # (L, K)
    fig, ax = plt.subplots(figsize=(11, 3.6))
    used = [k for k in range(len(labels)) if weights[:, k].max() > 0.02]
    colors = plt.get_cmap("tab10")
    ax.stackplot(np.arange(len(weights)), *(weights[:, k] for k in used), labels=[labels[k] for k in used],
                 colors=[colors(k % 10) for k in used], alpha=0.85)
    top = max(1.0, float(weights.sum(1).max()) if len(weights) else 1.0)
    for start, domain in zip(starts, domains):
        ax.axvline(start, color="black", lw=1)
        ax.text(start + 3, top * 1.02, f"text: {domain}", fontsize=8, va="bottom")
    for position in fired:
        ax.plot([position], [top * 0.97], marker="v", color="crimson", ms=7)
    ax.set_xlim(0, len(weights))
    ax.set_ylim(0, top * 1.12)
    ax.set_xlabel("token")
    ax.set_ylabel("blend weight")
    ax.set_title("LoRA blend in force at each token (▼ = <|shift|> fired)", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_step_sizes(log_lr, modules: list[str], path: str | Path) -> Path | None:
    """Meta-learned step sizes (``log_lr (steps, M, 2)``) as four heat maps: per step (rows) and module
    (columns, in depth order), for ``A`` and ``B`` of each module kind, on one log colour scale."""
    plt = pyplot(path)
    if plt is None:
        return None
    import numpy as np

    values = np.exp(np.asarray(log_lr, dtype=float))  # (S, M, 2)
    kinds = sorted({m.rsplit(".", 1)[-1] for m in modules})
    low, high = np.log10(values.min()), np.log10(values.max())
    fig, axes = plt.subplots(len(kinds), 2, figsize=(10, 1.6 + 1.6 * len(kinds)), squeeze=False,
                             layout="constrained")
    for row, kind in enumerate(kinds):
        columns = [i for i, m in enumerate(modules) if m.endswith(kind)]
        layers = [next((p for p in modules[i].split(".") if p.isdigit()), "?") for i in columns]
        for factor, name in enumerate(("A", "B")):
            ax = axes[row][factor]
            image = ax.imshow(np.log10(values[:, columns, factor]), aspect="auto", cmap="viridis", vmin=low,
                              vmax=high)
            ax.set_title(f"{kind} {name}", fontsize=9)
            ax.set_xticks(range(len(columns)), layers, fontsize=6)
            ax.set_yticks(range(values.shape[0]), [str(k + 1) for k in range(values.shape[0])], fontsize=6)
            ax.set_ylabel("step", fontsize=8)
    axes[-1][0].set_xlabel("layer", fontsize=8)
    axes[-1][1].set_xlabel("layer", fontsize=8)
    fig.colorbar(image, ax=axes, label="log10 step size")
    fig.suptitle("distill writer: meta-learned step sizes", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_losses(losses: list[float], path: Path, title: str) -> None:
    plt = pyplot(path)
    if plt is None:
        return

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(range(1, len(losses) + 1), losses, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("train NLL (nats/token)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

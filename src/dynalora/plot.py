"""Pictures people would rather look at than read: blend weights over the tokens of a stream."""

from __future__ import annotations

from pathlib import Path


def plot_blend_timeline(blends: list[list[float]], labels: list[str], starts: list[int], domains: list[str],
                        fired: list[int], path: str | Path) -> Path:
    """Stacked blend weights per token, segment boundaries (labelled with their domain) and trigger marks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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

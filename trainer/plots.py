"""Training curves as a picture: ``OUTPUT/training.png`` from ``metrics.jsonl``.

TensorBoard holds the same scalars for live runs; the PNG is what one attaches to a report or
looks at over ssh without a server. matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

import json
from pathlib import Path


def metric_rows(metrics_jsonl: str | Path) -> list[dict]:
    """The rows of ``metrics.jsonl``, one per step in step order: where a step was logged twice (a
    resumed run's log from before the fix that cuts it back, or a hand-joined log) the last one wins,
    since it is what the final weights were trained with. Lines cut by a crash are skipped."""
    by_step: dict[int, dict] = {}
    for line in Path(metrics_jsonl).read_text().splitlines():
        try:
            row = json.loads(line)
            by_step[int(row["step"])] = row
        except (ValueError, KeyError, TypeError):
            continue
    return [by_step[k] for k in sorted(by_step)]


def plot_metrics(metrics_jsonl: str | Path, out_png: str | Path) -> Path:
    """Loss (with a moving average), temperature, learning rate and throughput against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in metric_rows(metrics_jsonl) if not r.get("skipped")]
    if not rows:
        raise ValueError(f"{metrics_jsonl} has no finished steps to plot")
    steps = [r["step"] for r in rows]
    loss = [r["loss"] for r in rows]
    window = max(1, len(loss) // 20)
    smooth = [sum(loss[max(0, i - window + 1):i + 1]) / len(loss[max(0, i - window + 1):i + 1]) for i in range(len(loss))]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), constrained_layout=True)
    ax = axes[0, 0]
    ax.plot(steps, loss, color="0.75", lw=1, label="loss")
    ax.plot(steps, smooth, color="C0", lw=2, label=f"moving average ({window} steps)")
    ax.set(title="segment-text contrastive loss", xlabel="step")
    ax.legend()
    axes[0, 1].plot(steps, [1.0 / r["logit_scale"] for r in rows], color="C1")
    axes[0, 1].set(title="temperature (1 / logit scale)", xlabel="step")
    axes[1, 0].plot(steps, [r["lr"] for r in rows], color="C2")
    axes[1, 0].set(title="learning rate", xlabel="step")
    rate = [r["segments"] / max(r["data_time"] + r["step_time"], 1e-9) for r in rows]
    axes[1, 1].plot(steps, rate, color="C3", lw=1)
    axes[1, 1].set(title="segments / s (this rank)", xlabel="step")
    for a in axes.flat:
        a.grid(alpha=0.3)
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png

"""Loss (training, and validation when logged) and learning-rate curves of a run folder as a PNG
(rank 0, at the end of training). In the run folder of a stage chain (`megaqwen-stages`, which
records its stages in stages.json) a dashed line and the stage's name and length mark where each
stage begins.

    python -m megaqwen.train.plot runs/demo        # writes runs/demo/loss.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STAGES_RECORD = "stages.json"
"""A stage chain's record in its run folder (written by train.stages; its stage starts are marked)."""


def plot_run(out_dir: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(out_dir) / "loss.png"
    fig = loss_figure(out_dir)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def stage_starts(out_dir: str | Path) -> list[tuple[int, str]]:
    """(first step, label) of every stage a stage chain has started in `out_dir` (from its
    stages.json; [] for a plain run)."""
    path = Path(out_dir) / STAGES_RECORD
    if not path.is_file():
        return []
    stages = json.loads(path.read_text()).get("stages", [])
    return [(s["start_step"] + 1, f"{s['name']} ({s['seq_len']:,} tok)") for s in stages
            if s.get("start_step") is not None]


def loss_figure(out_dir: str | Path):
    """The figure plot_run saves: loss (and validation loss) over lr, stage starts marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    rows: dict[int, dict] = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row  # a resumed run may rewrite steps after its checkpoint: keep the last
    steps = sorted(rows)
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 5), sharex=True,
                                         gridspec_kw={"height_ratios": [3, 1]})
    ax_loss.plot(steps, [rows[s]["loss"] for s in steps], lw=1.5, label="training")
    val = [s for s in steps if "val_loss" in rows[s]]
    if val:
        ax_loss.plot(val, [rows[s]["val_loss"] for s in val], "o-", color="tab:green", lw=1.5, ms=4,
                     label="validation")
        ax_loss.legend()
    for i, (first, label) in enumerate(stage_starts(out_dir)):
        if i:  # a switch: between the previous stage's last step and this one's first
            for ax in (ax_loss, ax_lr):
                ax.axvline(first - 0.5, color="grey", ls="--", lw=1)
        note = ax_loss.text(first - 0.5, 0.98, f" {label}", transform=ax_loss.get_xaxis_transform(),
                            va="top", fontsize=8, color="dimgrey", clip_on=True)
        note.set_in_layout(False)  # a label by the right edge must not squeeze the axes (tight_layout)
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.set_title(f"{out_dir.name}: {len(steps)} steps")
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(steps, [rows[s]["lr"] for s in steps], color="tab:orange", lw=1.2)
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    print(plot_run(sys.argv[1]))

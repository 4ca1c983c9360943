"""The run folder's loss plot: in a stage chain's folder every stage switch is marked and labelled."""

import dataclasses
import json

from megaqwen.train.plot import loss_figure, plot_run, stage_starts
from megaqwen.train.stages import _write_record, load_chain


def _metrics(out, steps: int) -> None:
    rows = [{"step": s, "loss": 10.0 - 0.5 * s, "lr": 1e-3} for s in range(1, steps + 1)]
    (out / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_stage_switches_are_marked_where_the_next_stage_starts(tmp_path):
    """The debug chain's record (4 + 2 + 2 steps) while its last stage runs: lines before steps 5 and 7."""
    chain = load_chain("debug")
    record = {"chain": chain.name, "stages": [{**dataclasses.asdict(s), "status": "pending"}
                                               for s in chain.stages]}
    for entry, start, status in zip(record["stages"], (0, 4, 6), ("done", "done", "running")):
        entry.update(start_step=start, status=status)
    _write_record(tmp_path, record)
    _metrics(tmp_path, 7)
    assert stage_starts(tmp_path) == [(1, "s128 (128 tok)"), (5, "s512 (512 tok)"), (7, "s2048 (2,048 tok)")]
    fig = loss_figure(tmp_path)
    ax_loss, ax_lr = fig.axes
    dashed = [line.get_xdata()[0] for line in ax_loss.get_lines() if line.get_linestyle() == "--"]
    assert dashed == [4.5, 6.5] and len(ax_lr.get_lines()) == 1 + 2  # the lr curve and the two switches
    assert [t.get_text().strip() for t in ax_loss.texts] == ["s128 (128 tok)", "s512 (512 tok)",
                                                             "s2048 (2,048 tok)"]
    record["stages"][2].pop("start_step")  # a stage not started yet is not drawn
    _write_record(tmp_path, record)
    assert [first for first, _ in stage_starts(tmp_path)] == [1, 5]


def test_plain_run_has_no_stage_marks(tmp_path):
    _metrics(tmp_path, 3)
    assert stage_starts(tmp_path) == []
    fig = loss_figure(tmp_path)
    assert not fig.axes[0].texts and len(fig.axes[0].get_lines()) == 1
    assert plot_run(tmp_path).stat().st_size > 1000

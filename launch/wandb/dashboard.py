"""W&B workspace and report for megaqwen runs, built from the metric registry.

    python launch/wandb/dashboard.py --entity ENTITY --project megaqwen   # create the workspace view
                                                                          # and the report in W&B
    python launch/wandb/dashboard.py --dry-run                            # print the definition, offline
    python launch/wandb/dashboard.py --dry-run --write launch/wandb/workspace.json   # refresh the copy

One workspace section per registry section (training, validation, throughput, memory, data mix, moe,
pipeline, reliability), one line plot per registry panel; families of keys (`moe/L{i}/e{e}`,
`mix/{name}`, ...) become regex panels. The report shows the sections a reader checks first. Pushing
needs `pip install wandb-workspaces==0.4.13` (the `wandb` extra) and a W&B login; --dry-run needs
neither.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megaqwen.train import metric_names as mn

WORKSPACE_JSON = Path(__file__).resolve().parent / "workspace.json"
WORKSPACES_PIN = "wandb-workspaces==0.4.13"
# panels across sections, drawn first in their section
EXTRA_PANELS = {"training": [{"title": "loss and validation loss", "metrics": ["loss", "val_loss"],
                              "regex": None, "unit": "nats/token"}]}
REPORT_SECTIONS = ("training", "validation", "throughput", "memory", "data mix", "moe", "reliability")


def definition() -> dict:
    """The workspace and report as plain data: sections -> panels -> registry metric names."""
    sections = []
    for section in mn.SECTIONS:
        panels: dict[str, list[mn.Metric]] = {}
        for m in mn.METRICS:
            if m.section == section:
                panels.setdefault(m.panel, []).append(m)
        out = [dict(p) for p in EXTRA_PANELS.get(section, [])]
        for title, ms in panels.items():
            fams = [m for m in ms if m.is_family]
            if fams and len(fams) != len(ms):
                raise ValueError(f"panel {title!r} mixes key families and plain keys "
                                 f"{[m.name for m in ms]}; give the families a panel of their own")
            units = sorted({m.unit for m in ms})
            out.append({"title": title, "metrics": [m.name for m in ms],
                        "regex": "^(" + "|".join(m.regex for m in fams) + ")$" if fams else None,
                        "unit": ", ".join(u for u in units if u)})
        sections.append({"name": section, "panels": out})
    return {
        "generated_by": "launch/wandb/dashboard.py from megaqwen/train/metric_names.py",
        "workspace": {"name": "megaqwen training", "x_axis": "Step", "sections": sections},
        "report": {"title": "megaqwen training run",
                   "description": "Loss, validation, throughput/MFU, memory, data mix, expert load and "
                                  "reliability (skipped steps, loss spikes, checkpoint time, stragglers) "
                                  "of megaqwen runs; metric definitions in docs/metrics.md.",
                   "sections": list(REPORT_SECTIONS)},
    }


def render(defn: dict) -> str:
    return json.dumps(defn, indent=2) + "\n"


def _import_wandb_workspaces():
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError as e:
        raise SystemExit(f"launch/wandb/dashboard.py needs the wandb-workspaces package ({e}): "
                         f"pip install '{WORKSPACES_PIN}' (or --dry-run, which needs nothing)") from e
    return ws, wr


def _line_plot(wr, panel: dict):
    kw = {"title": panel["title"], "title_y": panel["unit"] or None}
    if panel["regex"]:
        return wr.LinePlot(metric_regex=panel["regex"], **kw)
    return wr.LinePlot(y=list(panel["metrics"]), **kw)


def build_workspace(defn: dict, entity: str, project: str):
    """A `wandb_workspaces.workspaces.Workspace` (built offline; `.save()` creates it in W&B)."""
    ws, wr = _import_wandb_workspaces()
    w = defn["workspace"]
    sections = [ws.Section(name=s["name"], is_open=i < 3, panels=[_line_plot(wr, p) for p in s["panels"]])
                for i, s in enumerate(w["sections"])]
    return ws.Workspace(entity=entity, project=project, name=w["name"], sections=sections,
                        settings=ws.WorkspaceSettings(x_axis=w["x_axis"]))


def build_report(defn: dict, entity: str, project: str):
    """A `wandb_workspaces.reports.v2.Report` over the project's runs (`.save()` publishes it)."""
    _, wr = _import_wandb_workspaces()
    r = defn["report"]
    by_name = {s["name"]: s for s in defn["workspace"]["sections"]}
    blocks = [wr.H1(r["title"]), wr.P(r["description"])]
    for name in r["sections"]:
        blocks += [wr.H2(name), wr.PanelGrid(runsets=[wr.Runset(entity=entity, project=project)],
                                             panels=[_line_plot(wr, p) for p in by_name[name]["panels"]])]
    return wr.Report(entity=entity, project=project, title=r["title"], description=r["description"],
                     blocks=blocks)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entity", help="W&B entity (team or user)")
    ap.add_argument("--project", help="W&B project the runs log to (logger.wandb.project)")
    ap.add_argument("--dry-run", action="store_true", help="print the definition as JSON; no network")
    ap.add_argument("--write", type=Path, help="with --dry-run: also write the JSON to this file")
    args = ap.parse_args(argv)
    defn = definition()
    if args.dry_run:
        text = render(defn)
        if args.write:
            args.write.write_text(text)
        sys.stdout.write(text)
        return 0
    if args.write:
        ap.error("--write goes with --dry-run")
    if not (args.entity and args.project):
        ap.error("--entity and --project are required (or --dry-run)")
    workspace = build_workspace(defn, args.entity, args.project)
    report = build_report(defn, args.entity, args.project)
    workspace.save()
    report.save()
    print(f"workspace: {workspace.url}\nreport: {report.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""launch/wandb/dashboard.py: the committed workspace.json is what the script generates, every panel
draws registered metrics and every registered metric has a panel; the W&B objects build offline."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megaqwen.train import metric_names as mn

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "wandb" / "dashboard.py"


def _load():
    spec = importlib.util.spec_from_file_location("dashboard", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _example(name: str) -> str:
    for ph, v in (("{r}", "2"), ("{i}", "0"), ("{e}", "3"), ("{name}", "web")):
        name = name.replace(ph, v)
    return name


def test_committed_json_is_current_and_covers_the_registry():
    dash = _load()
    committed = (REPO / "launch" / "wandb" / "workspace.json").read_text()
    assert committed == dash.render(dash.definition()), (
        "launch/wandb/workspace.json is stale: python launch/wandb/dashboard.py --dry-run "
        "--write launch/wandb/workspace.json")
    defn = json.loads(committed)
    sections = defn["workspace"]["sections"]
    assert [s["name"] for s in sections] == list(mn.SECTIONS)
    drawn = [name for s in sections for p in s["panels"] for name in p["metrics"]]
    registered = {m.name for m in mn.METRICS}
    assert set(drawn) <= registered, f"panels draw unregistered metrics {set(drawn) - registered}"
    assert registered <= set(drawn), f"registered metrics without a panel {registered - set(drawn)}"
    families = [m for m in mn.METRICS if m.is_family]
    for p in (p for s in sections for p in s["panels"]):
        if p["regex"]:  # a family panel: its regex takes the keys of its families and no others
            hits = {m.name for m in families if re.fullmatch(p["regex"], _example(m.name))}
            assert hits == set(p["metrics"]), p
    assert set(defn["report"]["sections"]) <= set(mn.SECTIONS)


def test_cli_dry_run_prints_the_json_and_push_needs_entity(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--write", str(tmp_path / "w.json")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == (tmp_path / "w.json").read_text() == (SCRIPT.parent / "workspace.json").read_text()
    dash = _load()
    with pytest.raises(SystemExit):
        dash.main(["--project", "p"])  # no --entity and no --dry-run


def test_missing_package_is_a_clear_error(monkeypatch):
    dash = _load()
    monkeypatch.setitem(sys.modules, "wandb_workspaces", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "wandb_workspaces.workspaces", None)
    with pytest.raises(SystemExit, match="pip install 'wandb-workspaces=="):
        dash.build_workspace(dash.definition(), "e", "p")


def test_workspace_and_report_build_offline():
    pytest.importorskip("wandb_workspaces", reason="optional: pip install wandb-workspaces (the wandb extra)")
    dash = _load()
    defn = dash.definition()
    w = dash.build_workspace(defn, "ent", "proj")
    assert [s.name for s in w.sections] == list(mn.SECTIONS)
    assert [len(s.panels) for s in w.sections] == [len(s["panels"]) for s in defn["workspace"]["sections"]]
    view = w._to_model()  # the W&B view spec, as .save() would send it (no network)
    panels = [p for s in view.spec.section.panel_bank_config.sections for p in s.panels]
    assert sum(len(s["panels"]) for s in defn["workspace"]["sections"]) == len(panels)
    report = dash.build_report(defn, "ent", "proj")
    assert report.title == defn["report"]["title"]
    assert len(report.blocks) == 2 + 2 * len(defn["report"]["sections"])  # title, text, (heading, grid)s

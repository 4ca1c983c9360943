"""`megaqwen-data` as a user meets it: the help, a missing extra, `key=value` overrides of a config."""

from __future__ import annotations

import argparse
import sys

import pytest

from megaqwen.data_pipeline.cli import build_parser, main, missing_extra
from megaqwen.data_pipeline.config import load_config
from megaqwen.data_pipeline.steps import build_steps


def test_missing_data_extra_is_one_line_with_the_install_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasketch", None)  # what `import datasketch` meets when absent
    rc = main(["pipeline", "--config", "sample", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err == (
        "megaqwen-data: error: 'pipeline' needs the data extra (datasketch is not installed): "
        "pip install -e '.[data]'\n"
    )
    # a module that belongs to no extra is a bug, not a missing install: it is not swallowed
    assert missing_extra(ModuleNotFoundError("x", name="torch")) is None


def test_help_describes_each_subcommand_for_a_user(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "add_parser" not in text and "`func`" not in text  # the plumbing the description used to show
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {a.dest: a.help for a in sub._choices_actions}
    assert set(helps) == {"tokenize", "pipeline", "tiny-judge", "verify-pairs"}
    for name, h in helps.items():  # a sentence on what it is for, shown in `megaqwen-data --help`
        assert h and len(h.split()) >= 6 and h.split()[0] in text, (name, h)
    with pytest.raises(SystemExit):
        main(["pipeline", "--help"])
    pipeline_help = capsys.readouterr().out
    assert "--rerun" in pipeline_help and "KEY=VALUE" in pipeline_help


def test_overrides_set_nested_keys_with_types():
    cfg = load_config(
        "sample",
        sets=[
            "remix.stages.stage-4k.max_epochs=2",
            "remix.stages.stage-32k.token_budget=1e6",  # YAML reads 1e6 as a string; an int field takes it
            "steps.route.prose.gopher_quality.min_doc_words=30",  # a parameter the YAML does not list
            "dedup.threshold=0.8",
            "domains.taxonomy.social media=posts and threads",
            "input.paths=corpus/*.jsonl",  # a list field takes one value as a list of one
            "judge.model=7",  # a str field keeps the text, not YAML's number
        ],
    )
    stages = {s.name: s for s in cfg.remix.stages}
    assert stages["stage-4k"].max_epochs == 2.0 and isinstance(stages["stage-4k"].max_epochs, float)
    assert stages["stage-32k"].token_budget == 1_000_000 and isinstance(stages["stage-32k"].token_budget, int)
    assert cfg.dedup.threshold == 0.8 and cfg.domains.taxonomy["social media"] == "posts and threads"
    assert cfg.input.paths == ["corpus/*.jsonl"] and cfg.judge.model == "7"
    route = next(s for s in build_steps(cfg.steps) if s.name == "route")
    gopher = next(s for s in route.routes["prose"] if s.name == "gopher_quality")
    assert gopher.cfg.min_doc_words == 30
    assert load_config("sample").remix.stages[0].max_epochs == 4.0  # the YAML itself is untouched


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("remix.stages.stage-4k.max_epoch=2",
         "unknown config key 'remix.stages.stage-4k.max_epoch' "
         "(did you mean remix.stages.stage-4k.max_epochs?)"),
        ("max_epochs=2",
         "(did you mean remix.stages.stage-32k.max_epochs or remix.stages.stage-4k.max_epochs?)"),
        ("steps.route.prose.gopher_qualty.min_doc_words=30",
         "(did you mean steps.route.prose.gopher_quality.min_doc_words?)"),
        ("workers=two", "override 'workers=two': expected int, got 'two' (str)"),
        ("steps.route.prose.gopher_quality.min_doc_words=1.5", "expected int, got 1.5 (float)"),
        ("dedup.exact=maybe", "expected bool, got 'maybe' (str)"),
        ("remix.stages.stage-4k.factors.code=lots", "expected float, got 'lots' (str)"),
        ("dedup.threshold", "override 'dedup.threshold' is not KEY=VALUE"),
    ],
)  # fmt: skip
def test_bad_overrides_are_refused_naming_the_key(override: str, message: str):
    with pytest.raises(ValueError) as e:
        load_config("sample", sets=[override])
    assert message in str(e.value)


def test_cli_refuses_a_bad_override_in_one_line(capsys, tmp_path):
    rc = main(["pipeline", "--config", "sample", "--output-dir", str(tmp_path / "out"), "dedup.treshold=0.8"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1
    assert "unknown config key 'dedup.treshold' (did you mean dedup.threshold?)" in err
    assert not (tmp_path / "out").exists()  # refused before any work

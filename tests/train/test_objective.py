"""The objective contract (megaqwen/train/objective.py): per-token log-probabilities and
per-sequence sums against plain PyTorch, the step meter's weighting of named aux terms, objective
look-up errors, and a reference-model objective loaded by import path, in one process and under
layouts (pp x cp, tp x FSDP) through the real launcher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megaqwen.kernels.cross_entropy import IGNORE_INDEX
from megaqwen.models.config import get_config
from megaqwen.models.outputs import AuxTerm
from megaqwen.models.spec import get_spec
from megaqwen.train.metric_names import unregistered
from megaqwen.train.objective import LM, ObjectiveParts, StepMeter, get_objective, row_sums, sequence_sums
from tests.parallel.test_launch import launch, shard, single_process  # noqa: F401  (fixture)

TESTS = Path(__file__).resolve().parents[1]


def _model(name="debug"):
    torch.manual_seed(0)
    cfg = get_config(name, vocab_size=512)
    return get_spec(cfg).build(cfg, seed=0), cfg


def test_token_logprobs_equal_log_softmax_and_the_loss():
    model, cfg = _model()
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    labels = torch.randint(0, cfg.vocab_size, (2, 9))
    labels[0, :3] = IGNORE_INDEX
    pos, _ = model.prepare_inputs(tokens, None, None)
    h = model.hidden_states(tokens, pos)
    got = model.token_logprobs(h, labels)
    want = F.log_softmax(model.logits(h).float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    want = want.masked_fill(labels == IGNORE_INDEX, 0.0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(-got.sum(), model.loss(h, labels).sum, atol=1e-4, rtol=1e-5)


def test_sequence_sums_per_packed_document():
    values = torch.arange(12, dtype=torch.float32).view(2, 6)
    labels = torch.ones(2, 6, dtype=torch.long)
    labels[1, 5] = IGNORE_INDEX
    docs = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 0, 0]])
    sums, rows = sequence_sums(values, {"labels": labels, "document_ids": docs})
    assert sums.tolist() == [0 + 1, 2 + 3 + 4, 5, 6 + 7 + 8 + 9 + 10]
    assert rows.tolist() == [0, 0, 0, 1]


def test_row_sums_mask_ignored_labels_without_context_parallelism():
    values = torch.arange(8, dtype=torch.float32).view(2, 4).requires_grad_()
    labels = torch.tensor([[1, 1, -100, 1], [-100, 1, 1, 1]])
    sums = row_sums(values, {"labels": labels, "cp_group": None})
    assert sums.tolist() == [0 + 1 + 3, 5 + 6 + 7]
    sums.sum().backward()
    assert values.grad.tolist() == [[1, 1, 0, 1], [0, 1, 1, 1]]


def test_step_meter_adds_named_aux_terms_with_their_coefficients():
    meter = StepMeter(scale=0.5, aux_weight=0.25)
    parts = ObjectiveParts(torch.tensor(8.0, requires_grad=True), torch.tensor(4))
    z = torch.tensor(2.0, requires_grad=True)
    aux = {"z_loss": AuxTerm(z, 0.1), "aux_loss": AuxTerm(torch.tensor(3.0), 0.0)}
    total = meter.add(parts, aux)
    assert total.item() == pytest.approx(8 * 0.5 + 0.1 * 2 * 0.25)
    total.backward()
    assert z.grad.item() == pytest.approx(0.1 * 0.25)  # a coefficient-0 term is logged, not trained
    out = meter.reduce(torch.tensor(4.0), micro_batches=2, env_mesh=None)
    assert out == pytest.approx({"loss": 2.0, "z_loss": 1.0, "aux_loss": 1.5})


def test_step_meter_refuses_an_undeclared_metric():
    """Pipeline ranks without the last stage reduce the declared names only: an undeclared one would
    desynchronise the reduction, so it is an error naming it."""
    meter = StepMeter(scale=1.0, aux_weight=1.0, metric_names=("dpo/margin",))
    meter.add(ObjectiveParts(torch.tensor(1.0), torch.tensor(1), {"dpo/margin": torch.tensor(3.0)}))
    with pytest.raises(ValueError, match="metric 'accuracy' it did not declare"):
        meter.add(ObjectiveParts(torch.tensor(1.0), torch.tensor(1), {"accuracy": torch.tensor(1.0)}))
    assert meter.reduce(torch.tensor(2.0), 1, None) == pytest.approx({"loss": 1.0, "dpo/margin": 1.5})


def test_objective_lookup_errors_name_the_problem():
    assert get_objective("lm") is LM
    with pytest.raises(ValueError, match="train.objective='lmm'.*did you mean lm"):
        get_objective("lmm")
    with pytest.raises(ValueError, match="cannot import"):
        get_objective("no_such_module_xyz:OBJ")
    with pytest.raises(ValueError, match="not a megaqwen.train.objective.Objective"):
        get_objective("megaqwen.train.objective:sequence_sums")


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


PLUGIN = ("train.objective=objective_plugin:REF_GAP",)


@pytest.fixture(scope="module")
def ref_one(tmp_path_factory, shard):  # noqa: F811
    """One process: a pretraining run (the initial weights), then the plugin objective from them with
    them as its frozen reference. (the init folder, the reference run's metrics rows); the plugin's
    folder stays importable, here and in launched ranks (PYTHONPATH), while the module's tests run."""
    base = tmp_path_factory.mktemp("ref_one")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", f"{TESTS}:{__import__('os').environ.get('PYTHONPATH', '')}")
        mp.syspath_prepend(str(TESTS))
        single_process(base / "init", shard)
        single_process(base / "ref", shard, *PLUGIN, f"train.init_from={base / 'init'}")
        yield base / "init", _rows(base / "ref")


def test_reference_objective_in_one_process(ref_one):
    """The reference is the init checkpoint, frozen: at step 1 the policy equals it (gap 0, its
    NLL is the loss); after two updates the policy has moved and the reference has not."""
    rows = ref_one[1]
    first, last = rows[0], rows[-1]
    assert first["objective/ref_gap"] < 1e-6
    assert first["objective/ref_nll"] == pytest.approx(first["loss"], rel=1e-6)
    assert last["objective/ref_gap"] > 1e-3
    assert last["objective/ref_nll"] != pytest.approx(last["loss"], rel=1e-4)
    assert unregistered({k for r in rows for k in r}) == []  # objective/<name> is a documented family


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout", [("parallel.pp=2", "parallel.cp=2"),
                                    ("parallel.tp=2", "parallel.dp_mode=fsdp")],
                         ids=["pp2-cp2", "tp2-fsdp-dp2"])
def test_reference_objective_under_layouts_equals_one_process(tmp_path, shard, ref_one, layout):  # noqa: F811
    """The reference model sharded like the policy (pipeline forward only / cp gather / tp vocab
    split / FSDP2): losses and both reference metrics equal one process."""
    init, one = ref_one
    run = launch(tmp_path / "lay", shard, *PLUGIN, f"train.init_from={init}", *layout, nproc=4)
    assert run.returncode == 0, run.stderr[-4000:]
    for got, want in zip(_rows(tmp_path / "lay"), one, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["objective/ref_nll"] == pytest.approx(want["objective/ref_nll"], rel=1e-5)
        assert got["objective/ref_gap"] == pytest.approx(want["objective/ref_gap"], rel=1e-4, abs=1e-6)


def test_a_reference_objective_without_weights_is_refused_before_work(tmp_path, monkeypatch, capsys):
    """No train.reference_from and no train.init_from: a one-line refusal naming both, before any
    model exists; a reference folder that does not exist is named too."""
    from train_cli import MODEL_BUILT, run_cli

    monkeypatch.syspath_prepend(str(TESTS))
    args = [f"train.out_dir={tmp_path / 'run'}", "train.steps=1", *PLUGIN]
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code != 0 and "needs a reference model: set train.reference_from" in err
    assert MODEL_BUILT not in out + err
    code, out, err = run_cli(monkeypatch, capsys, *args, f"train.reference_from={tmp_path / 'nowhere'}")
    assert code != 0 and "nowhere" in err and MODEL_BUILT not in out + err

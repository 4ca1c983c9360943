"""Per-step data-mix shares of a blend, against the blend order counted by hand."""

import json

import pytest

from megaqwen.data import BatchIterator, IndexedDatasetBuilder, build_dataset
from megaqwen.data.mix_metrics import MixMeter, mix_metrics, source_names

EOD = 151643


def _shards(folder, names):
    for k, name in enumerate(names):
        with IndexedDatasetBuilder(folder / name) as b:
            for doc in range(30):
                b.add_document([100 * (k + 1) + doc % 50] * (4 + doc % 5) + [EOD])
    return [str(folder / n) for n in names]


def test_step_shares_match_the_hand_counted_blend(tmp_path):
    _shards(tmp_path / "shards", ["code", "web"])
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"name": "r", "datasets": [{"prefix": "shards/code", "weight": 0.3},
                                                            {"prefix": "shards/web", "weight": 0.7}]}))
    ds = build_dataset(str(recipe), seq_len=8, num_samples=24, seed=0)
    # argmax_d(W_d (i+1) - 10 c_d), W = (3, 7), first on ties: the period of 10 samples reads
    # web code web web code web web web code web   (sources of samples 0..9)
    order = [1, 0, 1, 1, 0, 1, 1, 1, 0, 1]
    assert [ds.locate(i)[0] for i in range(10)] == order
    assert source_names(str(recipe)) == ["code", "web"]
    meter = MixMeter(ds, str(recipe))
    it = BatchIterator(ds, global_batch_size=4, micro_batch_size=2, dp_rank=0, dp_size=2)
    got = []
    for _ in range(3):
        it.next_step()
        got.append(meter.step(it.consumed_samples, 4))
    # steps read samples 0-3 (1 code), 4-7 (1 code), 8-11 = period entries 8, 9, 0, 1 (code, web, web, code)
    assert got == [{"mix/code": 0.25, "mix/web": 0.75}, {"mix/code": 0.25, "mix/web": 0.75},
                   {"mix/code": 0.5, "mix/web": 0.5}]
    # over whole periods the shares are the recipe's weights exactly
    assert mix_metrics(ds, 0, 20, ["code", "web"]) == {"mix/code": 0.3, "mix/web": 0.7}


def test_names_single_source_and_bad_names(tmp_path):
    a = _shards(tmp_path / "a", ["web"])[0]
    b = _shards(tmp_path / "b", ["web"])[0]
    assert source_names([a, b]) == ["web_0", "web_1"]  # same file name twice: told apart by position
    single = build_dataset(a, seq_len=8, num_samples=8, seed=0)
    assert MixMeter(single, a).step(4, 4) == {}  # one source: nothing to plot
    blend = build_dataset([a, b], seq_len=8, num_samples=8, seed=0)
    assert mix_metrics(blend, 0, 4, ["web_0", "web_1"]) == {"mix/web_0": 0.5, "mix/web_1": 0.5}
    with pytest.raises(ValueError, match="1 names"):
        mix_metrics(blend, 0, 4, ["web"])

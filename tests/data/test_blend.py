import json
from fractions import Fraction

import numpy as np
import pytest
import torch

from megaqwen.data import BlendedDataset, IndexedDatasetBuilder, build_dataset, load_blend_recipe
from megaqwen.data.blend import rational_weights

EOD = 151643


def make_shards(folder, n=3):
    """Shard k holds tokens 100*(k+1)..: the source of any sample is readable from its tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        with IndexedDatasetBuilder(folder / f"d{k}") as b:
            for doc in range(11 + 3 * k):
                b.add_document([100 * (k + 1) + (doc % 50)] * (5 + doc % 7) + [EOD])
    return [str(folder / f"d{k}") for k in range(n)]


def source_of(sample):
    return int(sample["tokens"][sample["tokens"] != EOD][0]) // 100 - 1


def write_recipe(path, spec):
    path.write_text(json.dumps(spec))
    return path


def test_blend_hits_the_weights_at_every_prefix(tmp_path):
    make_shards(tmp_path / "shards")
    recipe = write_recipe(
        tmp_path / "stage.json",
        {
            "name": "stage-4k",
            "datasets": [
                {"prefix": "shards/d0", "weight": 3},
                {"prefix": "shards/d1", "weight": 5},
                {"prefix": "shards/d2", "weight": 2},
            ],
        },
    )
    n = 200
    ds = build_dataset(recipe, seq_len=6, num_samples=n, seed=1)
    assert isinstance(ds, BlendedDataset) and ds.name == "stage-4k" and len(ds) == n
    counts = np.zeros(3)
    for i in range(n):
        d, _ = ds.locate(i)
        assert source_of(ds[i]) == d
        counts[d] += 1
        assert np.all(np.abs(counts - np.array([0.3, 0.5, 0.2]) * (i + 1)) <= 1)
    assert counts.tolist() == [60, 100, 40]


def test_blend_uses_each_child_in_its_own_order(tmp_path):
    prefixes = make_shards(tmp_path)
    ds = build_dataset(prefixes, seq_len=6, num_samples=60, seed=2)  # equal weights
    per_child = {0: [], 1: [], 2: []}
    for i in range(60):
        d, j = ds.locate(i)
        per_child[d].append(j)
    assert all(v == list(range(20)) for v in per_child.values())


def test_recipe_paths_and_normalisation(tmp_path):
    make_shards(tmp_path / "shards", n=2)
    r = load_blend_recipe(
        write_recipe(
            tmp_path / "r.json",
            {
                "datasets": [
                    {"prefix": "shards/d0", "weight": 1},
                    {"prefix": str(tmp_path / "shards" / "d1"), "weight": 3},
                ]
            },
        )
    )
    assert r.name == "r" and r.weights == (0.25, 0.75)
    assert r.prefixes == (str(tmp_path / "shards" / "d0"), str(tmp_path / "shards" / "d1"))


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"datasets": [{"prefix": "a", "weight": -1}]}, "weight of .*a is -1"),
        ({"datasets": [{"prefix": "a", "weight": 0}, {"prefix": "b", "weight": 0}]}, "sum to 0"),
        ({"datasets": [{"prefix": "a", "wieght": 1}]}, r"datasets\[0\]"),
        ({"name": "x", "datsets": []}, r"unknown key\(s\) \['datsets'\]"),
        ({"datasets": []}, "non-empty list"),
        ({"datasets": [{"prefix": "a", "weight": "1"}]}, "weight of .*a is '1'"),
    ],
)
def test_bad_recipes_name_the_file(tmp_path, spec, match):
    path = write_recipe(tmp_path / "bad.json", spec)
    with pytest.raises(ValueError, match=match) as e:
        load_blend_recipe(path)
    assert "bad.json" in str(e.value)


def test_missing_recipe_and_missing_shard(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_blend_recipe(tmp_path / "nope.json")
    path = write_recipe(tmp_path / "r.json", {"datasets": [{"prefix": "gone", "weight": 1}]})
    with pytest.raises(FileNotFoundError, match=r"gone\.idx does not exist"):
        build_dataset(path, seq_len=4, num_samples=4)


class Sized(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def exact_greedy(W, Q, n):
    """Reference: Megatron's rule argmax_d(w_d * (i + 1) - count_d) in exact rationals w_d = W_d / Q."""
    w = [Fraction(x, Q) for x in W]
    counts, out = [0] * len(w), []
    for i in range(n):
        deficits = [w[d] * (i + 1) - counts[d] for d in range(len(w))]
        d = deficits.index(max(deficits))
        out.append((d, counts[d]))
        counts[d] += 1
    return out


@pytest.mark.parametrize("weights", [[0.6, 0.25, 0.15], [1.0, 2**0.5, 3.3, 0.01]])
def test_blend_order_matches_the_greedy_rule(weights):
    n = 700
    blend = BlendedDataset([Sized(n) for _ in weights], weights, n)
    assert [blend.locate(i) for i in range(n)] == exact_greedy(blend._W, blend.period, n)
    assert np.allclose(blend.weights, np.array(weights) / sum(weights), rtol=0, atol=1e-6)


def test_decimal_weights_are_exact_and_awkward_ones_bounded():
    assert rational_weights([0.3, 0.5, 0.2]) == ([3, 5, 2], 10)
    assert rational_weights([3, 5, 2]) == ([3, 5, 2], 10)
    W, Q = rational_weights([1.0, 2**0.5, 3.3, 1e-9])
    assert Q == 2**20 and sum(W) == Q and W[3] == 1


def test_periodic_order_gives_constant_time_far_lookups():
    n = 10**12  # a resume point far into a long run costs one 20-entry table
    blend = BlendedDataset([Sized(n), Sized(n)], [0.35, 0.65], n)
    assert blend.period == 20
    d, j = blend.locate(n - 1)
    assert len(blend._dataset_index) == 20
    ref = exact_greedy([7, 13], 20, 40)
    assert blend.locate(10**6 * 20 + 23) == (ref[23][0], 10**6 * (7 if ref[23][0] == 0 else 13) + ref[23][1])
    assert (d, j) == (ref[19][0], (n // 20 - 1) * (7 if ref[19][0] == 0 else 13) + ref[19][1])

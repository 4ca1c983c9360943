"""The planner against Megatron-LM's published runs (`megaqwen.plan.megatron`: Narayanan et al. 2021,
Table 1, with the micro-batches and interleaving of Megatron-LM's run script). Per-GPU throughput
within the stated error band (`perf.ERROR_BAND`) of each published figure, so the rank order holds
wherever the published figures differ by more than the band allows."""

from __future__ import annotations

import itertools
import math

from megaqwen.plan.megatron import TABLE1, predicted_tflops
from megaqwen.plan.perf import ERROR_BAND


def test_throughput_within_the_error_band_and_the_published_rank_order():
    pred = {r.params_b: predicted_tflops(r) for r in TABLE1}
    errors = {b: pred[b] / r.tflops - 1 for b, r in zip(pred, TABLE1)}
    assert all(abs(e) <= ERROR_BAND for e in errors.values()), errors
    mean_log = sum(math.log(1 + e) for e in errors.values()) / len(errors)
    assert abs(mean_log) < 0.01, mean_log  # DEFAULT_EFFICIENCY is the fit: no overall bias
    for a, b in itertools.permutations(TABLE1, 2):
        if a.tflops > b.tflops * (1 + ERROR_BAND) / (1 - ERROR_BAND):
            assert pred[a.params_b] > pred[b.params_b], (a, b, pred)

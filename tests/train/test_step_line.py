"""The per-step console line: what a parallel run's user looks for, taken from the metrics row."""

import logging

import torch

from megaqwen.parallel.expert_parallel import LayerLoad
from megaqwen.train.metrics import MetricsLogger, cp_label, step_line
from megaqwen.train.moe_metrics import moe_metrics

BASE = {"loss": 2.5, "lr": 3e-4, "grad_norm": 0.5, "tokens_per_s": 1234.0, "peak_mem_gib": 1.0}


def test_plain_run_line_has_the_basics_and_nothing_parallel():
    line = step_line(5, 40, {**BASE, "peak_mem_gib_max": 1.0}, 0.5, 70.0)
    assert line == ("step 5/40 | loss 2.5000 | lr 3.00e-04 | gnorm 0.500 | 1234 tok/s | mem 1.00 GiB | "
                    "0.50 step/s | eta 0:01:10")


def test_multi_rank_line_names_the_rank_with_the_most_memory():
    m = {**BASE, "peak_mem_gib_max": 3.5, "peak_mem_gib/rank0": 1.0, "peak_mem_gib/rank1": 2.0,
         "peak_mem_gib/rank2": 3.5, "mfu": 0.412}
    line = step_line(5, 40, m, 0.5, float("nan"))
    assert "| mem 1.00 GiB (max 3.50 GiB on rank 2) |" in line
    assert "| mfu 41.2% |" in line and line.endswith("eta ?")
    # a large world lists no per-rank keys: the maximum alone
    assert "(max 3.50 GiB) |" in step_line(5, 40, {**BASE, "peak_mem_gib_max": 3.5}, 0.5, 1.0)


def test_pipeline_line_shows_the_measured_bubble_and_the_largest_stage():
    m = {**BASE, "peak_mem_gib_max": 2.25, "pp_bubble_theory": 0.2, "pp_bubble_measured": 0.314,
         "pp_rank0_peak_mem_gib": 1.0, "pp_rank1_peak_mem_gib": 2.25, "pp_rank2_peak_mem_gib": 1.5}
    line = step_line(5, 40, m, 0.5, 1.0)
    assert "| pp bubble 31% (theory 20%), largest stage pp1 2.25 GiB |" in line


def test_moe_line_shows_router_losses_and_the_worst_layer():
    loads = {"model.layers.1.mlp": LayerLoad(torch.tensor([2.0, 2, 2, 2]), 0.0),
             "model.layers.3.mlp": LayerLoad(torch.tensor([6.0, 2, 0, 0]), 2.0)}
    m = {**BASE, **moe_metrics(loads, aux_loss=1.0123, z_loss=0.00042)}
    line = step_line(5, 40, m, 0.5, 1.0)
    # layer 3: expert 0 took 6 of 8 assignments, 3x its fair share; 2 of 16 assignments dropped
    assert "| aux 1.0123, z 4.20e-04, expert load max 3.00x (L3), dropped 12.5% |" in line
    no_drop = {**BASE, **moe_metrics({"model.layers.0.mlp": LayerLoad(torch.tensor([3.0, 1]), 0.0)})}
    assert "| expert load max 1.50x (L0) |" in step_line(5, 40, no_drop, 0.5, 1.0)  # no drops, no losses


def test_cp_mode_comes_from_the_config_and_reaches_the_logged_line(tmp_path, caplog):
    assert cp_label({"parallel": {"cp": 1, "cp_mode": "ring"}}) == ""
    assert cp_label({"parallel": {"cp": 4, "cp_mode": "alltoall"}}) == "cp 4 alltoall"

    class NoWandb:
        enabled = False
        mode = "disabled"

    logger = MetricsLogger(tmp_path, {"parallel": {"cp": 2, "cp_mode": "ring"}}, NoWandb(), total_steps=3)
    with caplog.at_level(logging.INFO, logger="megaqwen.train.metrics"):
        logger.log(1, {**BASE, "peak_mem_gib_max": 1.0})
    logger.close()
    assert "| cp 2 ring |" in caplog.text and "step 1/3 | loss 2.5000" in caplog.text

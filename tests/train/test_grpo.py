"""`train.objective=grpo` (megaqwen/train/grpo.py): the loss and its gradient on fixed rollouts against
an independent plain computation of the published formulas (GRPO, Shao et al. 2024 eq. 3 with the k3
KL of eq. 4; DAPO's clip-higher and token-level loss, Yu et al. 2025 eq. 10/12; Dr. GRPO's constant
normaliser, Liu et al. 2025), written here with Python loops over responses and tokens; the group
advantages and the equal-group filter by hand; the step's sum / units unchanged when the batch is cut
into micro-batches and dp pieces; the contract path through the debug model; config refusals."""

from __future__ import annotations

import math
import statistics
from dataclasses import replace

import pytest
import torch

from megaqwen.kernels.cross_entropy import IGNORE_INDEX as X
from megaqwen.models.config import get_config
from megaqwen.models.spec import get_spec
from megaqwen.train.config import Config, DataConfig, TrainConfig
from megaqwen.train.grpo import (
    GRPO,
    GRPOConfig,
    equal_groups,
    group_advantages,
    grpo_objective,
    kept_rows,
    token_advantages,
)
from megaqwen.train.metric_names import unregistered
from megaqwen.train.objective import REFERENCE_FIELD
from megaqwen.train.objectives import objective_for
from megaqwen.train.rollout_config import RolloutConfig

V, T, PROMPT, GROUP, MAX_NEW = 11, 9, 3, 4, 7


class _LogSoftmax:
    """A stand-in policy whose final hidden states ARE its logits: token_logprobs is log_softmax(h)
    at the label (0 where -100), the contract's shape; h.grad is then the gradient w.r.t. the logits."""

    def token_logprobs(self, h, labels):
        lp = torch.log_softmax(h.float(), -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        return torch.where(labels != X, lp, 0.0)


def _rollouts(seed: int = 0, groups: int = 2):
    """groups x GROUP responses of 1..MAX_NEW - 1 tokens after a PROMPT-token prompt, right-padded:
    logits (B, T, V), labels, per-response rewards, old and reference log-probs near the policy's."""
    g = torch.Generator().manual_seed(seed)
    b = groups * GROUP
    logits = torch.randn(b, T, V, generator=g)
    labels = torch.full((b, T), X)
    lengths = torch.randint(1, MAX_NEW, (b,), generator=g).tolist()
    for i, n in enumerate(lengths):
        labels[i, PROMPT - 1:PROMPT - 1 + n] = torch.randint(0, V, (n,), generator=g)
    lp = _LogSoftmax().token_logprobs(logits, labels)
    # old / reference policies: the current one moved by up to +-0.4 nats per token (ratios 0.67..1.5,
    # so both clips act at 0.2 / 0.28), and garbage where the label is -100 (must not matter)
    old = torch.where(labels != X, lp + (torch.rand(b, T, generator=g) - 0.5) * 0.8, 7.0)
    ref = torch.where(labels != X, lp + (torch.rand(b, T, generator=g) - 0.5) * 0.8, -9.0)
    rewards = torch.randint(0, 3, (b,), generator=g).float()
    return logits, labels, lengths, rewards, old, ref


def _published(logits, labels, lengths, adv, old, ref, cfg: GRPOConfig):
    """The loss from the papers' equations, with plain Python loops: J = mean over responses / tokens of
    min(r A, clip(r) A) - beta k3; loss = -J. Returns (loss, d loss / d logp as a (B, T) tensor, derived
    by hand: d(r A)/d logp = r A on the unclipped branch, 0 on the clipped one; d k3 / d logp =
    1 - exp(ref - logp))."""
    lp = _LogSoftmax().token_logprobs(logits, labels)
    n_resp, n_tok = len(lengths), sum(lengths)
    loss, grad = 0.0, torch.zeros_like(lp)
    for i, n in enumerate(lengths):
        if cfg.loss_agg == "token":
            w = 1.0 / n_tok
        elif cfg.loss_agg == "sequence":
            w = 1.0 / (n_resp * n)
        else:
            w = 1.0 / (n_resp * cfg.max_new_tokens)
        for t in range(PROMPT - 1, PROMPT - 1 + n):
            logp, a = lp[i, t].item(), float(adv[i])
            r = math.exp(logp - old[i, t].item())
            r_clip = min(max(r, 1 - cfg.clip_low), 1 + cfg.clip_high)
            surrogate = min(r * a, r_clip * a)
            clipped = (a > 0 and r > 1 + cfg.clip_high) or (a < 0 and r < 1 - cfg.clip_low)
            d = ref[i, t].item() - logp
            k3 = math.exp(d) - d - 1
            loss += -w * (surrogate - cfg.kl_coef * k3)
            grad[i, t] = -w * (0.0 if clipped else r * a) + w * cfg.kl_coef * (1 - math.exp(d))
    return loss, grad


def _advantages_by_hand(rewards, std_normalize, eps=1e-6):
    out = []
    for k in range(0, len(rewards), GROUP):
        grp = rewards[k:k + GROUP].tolist()
        mu, sd = statistics.mean(grp), statistics.stdev(grp)  # sample std (n - 1)
        out += [(r - mu) / (sd + eps) if std_normalize else r - mu for r in grp]
    return torch.tensor(out)


def _step(obj, logits, batch, n=1):
    """The trainer's arithmetic of one step cut into `n` pieces of rows (micro-batches, dp ranks), in
    one process: units counted on every piece first, each piece's parts.sum / global units
    back-propagated (as StepMeter's scale), metrics summed / units."""
    slices = _row_slices(len(batch["labels"]), n)
    pieces = [{k: v[rows] for k, v in batch.items()} for rows in slices]
    units = sum(int(obj.units(p)) for p in pieces)
    logits = logits.clone().requires_grad_()
    total, metrics = 0.0, {}
    for rows, piece in zip(slices, pieces, strict=True):
        parts = obj(_LogSoftmax(), logits[rows], {**piece, "cp_group": None})
        (parts.sum / units).backward()
        total += parts.sum.item() / units
        for k, v in parts.metrics.items():
            metrics[k] = metrics.get(k, 0.0) + v.item() / units
    return total, logits.grad, metrics


def _row_slices(b, n):
    per = b // n
    return [slice(i * per, (i + 1) * per) for i in range(n)]


def _batch(labels, adv, old, ref):
    return {"labels": labels, "advantages": adv, "old_logprobs": old, REFERENCE_FIELD: ref}


def _off(**kw) -> GRPOConfig:
    """Off-policy settings (mu = 2 updates per rollout): the objective reads `old_logprobs`."""
    return GRPOConfig(updates_per_rollout=2, **kw)


CASES = [
    _off(),  # DAPO token-level, symmetric clip, no KL
    _off(loss_agg="sequence", kl_coef=0.04),  # GRPO as published
    _off(loss_agg="token", clip_high=0.28, kl_coef=0.1),  # DAPO clip-higher + KL
    _off(loss_agg="constant", std_normalize=False, max_new_tokens=MAX_NEW),  # Dr. GRPO
    GRPOConfig(loss_agg="sequence", clip_low=0.1, clip_high=0.3, std_normalize=False, kl_coef=0.5,
               old_logprobs="rollout"),
]


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{c.loss_agg}-kl{c.kl_coef}-clip{c.clip_low}/"
                         f"{c.clip_high}-std{int(c.std_normalize)}")
def test_loss_and_gradient_equal_the_published_formulas(cfg):
    """Loss to 1e-6 and its gradient w.r.t. the logits to 1e-6 of the largest: the hand-derived
    d loss / d logp chained through log_softmax (onehot(label) - softmax(logits))."""
    logits, labels, lengths, rewards, old, ref = _rollouts(seed=3)
    adv = group_advantages(rewards, GROUP, cfg.std_normalize)
    assert torch.allclose(adv, _advantages_by_hand(rewards, cfg.std_normalize), atol=1e-6)
    want, dlogp = _published(logits, labels, lengths, adv, old, ref, cfg)
    obj = grpo_objective(cfg)
    assert obj.needs_reference == (cfg.kl_coef > 0)
    got, grad, metrics = _step(obj, logits, _batch(labels, adv, old, ref))
    assert got == pytest.approx(want, rel=1e-6, abs=1e-7)
    onehot = torch.nn.functional.one_hot(labels.clamp(min=0), V).float()
    want_grad = dlogp[..., None] * (onehot - torch.softmax(logits, -1))
    assert (grad - want_grad).abs().max() <= 1e-6 * want_grad.abs().max()
    assert set(metrics) == set(obj.metrics) and unregistered(metrics) == []


def test_both_clips_act_and_the_metrics_are_their_shares():
    """On the fixed rollouts some tokens are clipped low and some high (the test above covers the
    clipped branch); the logged shares and ratio mean equal a count by hand (token-level)."""
    logits, labels, lengths, rewards, old, ref = _rollouts(seed=3)
    cfg = _off(clip_high=0.28, kl_coef=0.1)
    adv = group_advantages(rewards, GROUP)
    _, _, m = _step(grpo_objective(cfg), logits, _batch(labels, adv, old, ref))
    lp = _LogSoftmax().token_logprobs(logits, labels)
    low = high = ratio = kl = nll = 0.0
    for i, n in enumerate(lengths):
        for t in range(PROMPT - 1, PROMPT - 1 + n):
            r, a = math.exp(lp[i, t].item() - old[i, t].item()), adv[i].item()
            low += a < 0 and r < 0.8
            high += a > 0 and r > 1.28
            ratio += r
            d = ref[i, t].item() - lp[i, t].item()
            kl += math.exp(d) - d - 1
            nll -= lp[i, t].item()
    n_tok = sum(lengths)
    assert low > 0 and high > 0
    assert m == pytest.approx({"grpo/clip_low": low / n_tok, "grpo/clip_high": high / n_tok,
                               "grpo/ratio": ratio / n_tok, "grpo/kl": kl / n_tok, "grpo/nll": nll / n_tok},
                              rel=1e-5)


@pytest.mark.parametrize("agg", ["token", "sequence", "constant"])
def test_micro_batches_and_dp_pieces_give_the_step_of_one_piece(agg):
    """The step's sum / units and its gradient are the same for the whole batch, 2 micro-batches, and
    dp2 x 2 micro-batches (4 pieces, each its own units): a response never spans two pieces."""
    logits, labels, lengths, rewards, old, ref = _rollouts(seed=5, groups=2)
    cfg = _off(loss_agg=agg, kl_coef=0.05, clip_high=0.28)
    batch = _batch(labels, group_advantages(rewards, GROUP), old, ref)
    obj = grpo_objective(cfg)
    one, g1, m1 = _step(obj, logits, batch)
    for n in (2, 4):
        got, g, m = _step(obj, logits, batch, n)
        assert got == pytest.approx(one, rel=1e-6, abs=1e-7)  # fp32 sums in another order
        assert torch.allclose(g, g1, atol=1e-7, rtol=1e-5)
        assert m == pytest.approx(m1, rel=1e-6, abs=1e-7)


def test_per_token_advantages_equal_per_response_ones():
    logits, labels, _, rewards, old, ref = _rollouts(seed=2)
    adv_B = group_advantages(rewards, GROUP)
    adv_BT = token_advantages(adv_B, labels)
    assert adv_BT.shape == labels.shape and (adv_BT[labels == X] == 0).all()
    obj = grpo_objective(_off())
    a, ga, _ = _step(obj, logits, _batch(labels, adv_B, old, ref))
    b, gb, _ = _step(obj, logits, _batch(labels, adv_BT, old, ref))
    assert a == b and torch.equal(ga, gb)
    with pytest.raises(ValueError, match="fit neither the rows"):
        token_advantages(adv_B[:3], labels)


def test_group_advantages_and_the_equal_group_filter_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.5, 0.5, 0.5, 1.5])
    std = math.sqrt(1 / 3)  # sample std of [1, 0, 0, 1]: squares sum 1, over n - 1 = 3
    want = [0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std, 0, 0, 0, 0]
    mu = 0.75
    sd = statistics.stdev([0.5, 0.5, 0.5, 1.5])
    want += [(0.5 - mu) / sd] * 3 + [(1.5 - mu) / sd]
    assert group_advantages(r, 4, eps=0.0)[:4].tolist() == pytest.approx(want[:4], rel=1e-6)
    assert group_advantages(r, 4, eps=1e-6).tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert group_advantages(r, 4, std_normalize=False).tolist() == pytest.approx(
        [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -0.25, -0.25, -0.25, 0.75])
    assert equal_groups(r, 4).tolist() == [False, True, False]
    assert kept_rows(r, 4).tolist() == [True] * 4 + [False] * 4 + [True] * 4
    with pytest.raises(ValueError, match="do not split into groups of 5"):
        group_advantages(r, 5)


def test_rows_without_labels_are_not_responses_and_on_policy_reads_no_old_logprobs():
    """A padding row (all -100) adds no unit under any aggregation. On-policy (mu = 1, recompute) the
    objective reads no `old_logprobs` and equals the off-policy objective given old = the current
    log-probs, loss and gradient: ratio exactly 1, loss -mean(A) per response (sequence)."""
    logits, labels, lengths, rewards, old, ref = _rollouts(seed=4)
    labels[0] = X
    lp = _LogSoftmax().token_logprobs(logits, labels)
    adv = group_advantages(rewards, GROUP)
    for agg in ("token", "sequence"):
        on = grpo_objective(GRPOConfig(loss_agg=agg))
        assert "old_logprobs" not in on.fields
        batch = _batch(labels, adv, lp, ref)
        assert int(on.units(batch)) == (sum(lengths[1:]) if agg == "token" else len(lengths) - 1)
        got, g, m = _step(on, logits, {k: v for k, v in batch.items() if k != "old_logprobs"})
        want, g_off, _ = _step(grpo_objective(_off(loss_agg=agg)), logits, batch)
        assert got == pytest.approx(want, rel=1e-6, abs=1e-8) and torch.allclose(g, g_off, atol=1e-8)
        if agg == "sequence":
            assert got == pytest.approx(-adv[1:].mean().item(), rel=1e-6)
        assert m["grpo/ratio"] == 1.0


def test_through_the_debug_model_contract():
    """The real model's token_logprobs (chunked cross-entropy over the tied head) inside the real
    forward (`model(tokens, objective=..., batch=...)`), against log_softmax of its full logits."""
    cfg = get_config("debug", vocab_size=64)
    model = get_spec(cfg).build(cfg, seed=0)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (4, 12), generator=g)
    labels = torch.full_like(tokens, X)
    labels[:, 4:11] = tokens[:, 5:12]
    labels[1, 8:] = X
    pos = torch.arange(12).expand(4, 12)
    with torch.no_grad():
        lp = torch.log_softmax(model.logits(model.hidden_states(tokens, pos)), -1)
        lp = torch.where(labels != X, lp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1), 0.0)
    old = lp + 0.1 * torch.randn(lp.shape, generator=g)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    obj = grpo_objective(_off(loss_agg="sequence", kl_coef=0.1))
    batch = {"tokens": tokens, "labels": labels, "advantages": adv, "old_logprobs": old,
             REFERENCE_FIELD: lp - 0.2, "cp_group": None}
    parts = model(tokens, position_ids=pos, objective=obj, batch=batch).parts
    lengths = (labels != X).sum(1).tolist()
    want, _ = _published_rows(lp, labels, lengths, adv, old, lp - 0.2, GRPOConfig(loss_agg="sequence",
                                                                                  kl_coef=0.1))
    assert (parts.sum / obj.units(batch)).item() == pytest.approx(want, rel=1e-5)


def test_the_head_at_the_labelled_positions_only_equals_the_full_head():
    """`label_logprobs` and the lm/sft objective compute the vocabulary head only where a label is
    read (GRPO rows: a long prompt, a few response tokens): the same log-probabilities, loss and
    gradients (hidden states and tied head) as the full computation."""
    from megaqwen.train.objective import LM, label_logprobs, labelled_rows

    cfg = get_config("debug", vocab_size=64)
    model = get_spec(cfg).build(cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 10, cfg.hidden_size, generator=g, requires_grad=True)
    labels = torch.full((3, 10), X)
    labels[0, 6:9], labels[2, 8] = torch.randint(0, 64, (3,), generator=g), 5
    assert labelled_rows(h, labels)[2].tolist() == [6, 7, 8, 28]
    weights = torch.randn(3, 10, generator=g)
    results = []
    for logp_fn, lm in ((model.token_logprobs, model.loss), (lambda h, y: label_logprobs(model, h, y),
                                                              lambda h, y: LM(model, h, {"labels": y}))):
        model.zero_grad()
        h.grad = None
        lp = logp_fn(h, labels)
        parts = lm(h, labels)
        ((lp * weights).sum() + parts.sum).backward()
        results.append((lp.detach(), parts.sum.detach(), parts.count, h.grad.clone(),
                        model.head_weight().grad.clone()))
    full, sparse = results
    assert sparse[2] == full[2] == 4
    for a, b in zip(full, sparse):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    h_dense, _, none = labelled_rows(h, torch.zeros(3, 10, dtype=torch.long))  # dense labels: unchanged
    assert none is None and h_dense is h


def _published_rows(lp, labels, lengths, adv, old, ref, cfg):
    """`_published` for labels at arbitrary positions (each row's valid labels in order)."""
    loss = 0.0
    for i, n in enumerate(lengths):
        for t in (labels[i] != X).nonzero().flatten().tolist():
            r = math.exp(lp[i, t].item() - old[i, t].item())
            a = adv[i].item()
            d = ref[i, t].item() - lp[i, t].item()
            j = min(r * a, min(max(r, 1 - cfg.clip_low), 1 + cfg.clip_high) * a) - cfg.kl_coef * (
                math.exp(d) - d - 1)
            loss -= j / (len(lengths) * n)
    return loss, None


def test_objective_for_builds_grpo_from_its_section_and_refuses_bad_settings():
    def cfg(**g):
        return Config(train=TrainConfig(objective="grpo"), grpo=GRPOConfig(**g))

    assert objective_for(cfg()) is GRPO and not GRPO.needs_reference
    obj = objective_for(cfg(kl_coef=0.04, loss_agg="sequence"))
    assert obj.needs_reference and REFERENCE_FIELD in obj.fields and "grpo/response_length" in obj.metrics
    for bad, match in [({"loss_agg": "mean"}, "grpo.loss_agg='mean' is not one of"),
                       ({"group_size": 1}, "grpo.group_size must be >= 2"),
                       ({"clip_low": 1.0}, "0 <= grpo.clip_low < 1"),
                       ({"kl_coef": -0.1}, "grpo.kl_coef must be >= 0"),
                       ({"old_logprobs": "cache"}, "grpo.old_logprobs='cache'"),
                       ({"rewards": []}, "grpo.rewards is empty")]:
        with pytest.raises(ValueError, match=match):
            cfg(**bad).validate()
    # the native engine returns the experts it routed to, the others do not
    replay = replace(cfg(routing_replay=True, max_new_tokens=8), model=get_config("debug-moe"),
                     rollout=RolloutConfig(prompts="arithmetic"))
    replay.validate()
    with pytest.raises(ValueError, match="which only rollout.engine=native returns"):
        replace(replay, rollout=RolloutConfig(engine="hf", prompts="arithmetic")).validate()
    with pytest.raises(ValueError, match="model 'debug' has no routed experts"):
        replace(replay, model=get_config("debug")).validate()
    with pytest.raises(ValueError, match="validation of train.objective=grpo is not supported"):
        replace(cfg(), train=TrainConfig(objective="grpo", eval_every=5),
                data=DataConfig(valid_fraction=0.1)).validate()


def test_packed_rows_and_a_loss_mask_field_are_refused():
    _, labels, _, rewards, old, ref = _rollouts()
    batch = _batch(labels, group_advantages(rewards, GROUP), old, ref)
    docs = torch.zeros_like(labels)
    docs[0, 5:] = 1
    with pytest.raises(ValueError, match="rows must not be packed"):
        GRPO.units({**batch, "document_ids": docs})
    with pytest.raises(ValueError, match="set those labels to -100"):
        GRPO.units({**batch, "loss_mask": labels != X})


# ---------------------------------------------------------------------------------------------
# the trainer's step with a reference model, against transformers


def test_trainer_step_with_kl_equals_the_formula_with_transformers(tmp_path):
    """train_step with train.lr=0, policy A (init_from), frozen reference B (reference_from, built by
    the trainer because kl_coef > 0) and GRPO's sequence aggregation: the logged loss and grpo/kl equal
    the published formula on transformers' log-probabilities of A and B."""
    from transformers import AutoModelForCausalLM

    from megaqwen.parallel.config import ParallelConfig
    from tests.parallel.trainer_harness import build_run, layout_config, run_steps
    from tests.train.test_dpo import VOCAB, _hf_folder

    a, b = _hf_folder(tmp_path / "A", seed=1), _hf_folder(tmp_path / "B", seed=2)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, VOCAB, (4, 12), generator=g)
    labels = torch.full_like(tokens, X)
    for i, n in enumerate([6, 8, 3, 7]):
        labels[i, 3:3 + n] = tokens[i, 4:4 + n]
    pos = torch.arange(12).expand(4, 12).contiguous()
    batch = {"tokens": tokens, "labels": labels, "position_ids": pos,
             "document_ids": torch.zeros_like(tokens), "advantages": torch.tensor([1.0, -0.5, 0.25, -0.75])}

    def hf_logprobs(folder):
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            lp = torch.log_softmax(hf(tokens, position_ids=pos).logits.float(), -1)
        return torch.where(labels != X, lp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1), 0.0)

    pa, pb = hf_logprobs(a), hf_logprobs(b)
    cfg = layout_config(get_config("debug", vocab_size=VOCAB), ParallelConfig(), steps=1, global_batch=4,
                        micro_batch=2, seq_len=12, lr=0.0, seed=0)
    grpo = GRPOConfig(loss_agg="sequence", kl_coef=0.3)  # on-policy: ratio 1
    cfg = replace(cfg, train=replace(cfg.train, objective="grpo", init_from=str(a), reference_from=str(b)),
                  grpo=grpo)  # not validate(): no rollout.* here (the loop's); objective_for checks grpo.*
    (m,) = run_steps(build_run(cfg), [batch])
    lengths = (labels != X).sum(1).tolist()
    want, _ = _published_rows(pa, labels, lengths, batch["advantages"], pa, pb, grpo)
    d = torch.where(labels != X, pb - pa, 0.0)
    kl = ((torch.exp(d) - d - 1) * (labels != X)).sum(1) / (labels != X).sum(1)
    assert m["loss"] == pytest.approx(want, abs=1e-5)
    assert m["grpo/kl"] == pytest.approx(kl.mean().item(), rel=1e-4) and m["grpo/kl"] > 1e-3
    assert m["grpo/ratio"] == pytest.approx(1.0) and unregistered(m) == []

"""A user objective loaded by import path (`train.objective=objective_plugin:REF_GAP`, with tests/ on
PYTHONPATH): the LM loss, plus metrics that compare the policy with the frozen reference model."""

from megaqwen.kernels.cross_entropy import IGNORE_INDEX
from megaqwen.train.objective import Objective, ObjectiveParts
from megaqwen.train.reference import REFERENCE_FIELD


def _parts(model, h, batch):
    labels = batch["labels"]
    valid = labels != IGNORE_INDEX
    policy = model.token_logprobs(h, labels)
    ref = batch[REFERENCE_FIELD]
    lm = model.loss(h, labels)
    return ObjectiveParts(lm.sum, lm.count, {
        # 0 while the policy is the reference
        "objective/ref_gap": ((policy.detach() - ref).abs() * valid).sum(),
        "objective/ref_nll": -(ref * valid).sum(),  # the reference's own LM loss
    })


REF_GAP = Objective("ref_gap", _parts, units=lambda b: (b["labels"] != IGNORE_INDEX).sum(),
                    fields=("labels", REFERENCE_FIELD), needs_reference=True,
                    metrics=("objective/ref_gap", "objective/ref_nll"))

"""A stand-in for a vLLM `LLM` in CPU tests: records what `load_weights` receives."""

from __future__ import annotations

from types import SimpleNamespace


class RecordingModel:
    def __init__(self):
        self.calls: list[list[tuple[str, object]]] = []

    def load_weights(self, weights):
        self.calls.append([(name, t.clone()) for name, t in weights])  # consumes the stream, as vLLM


def fake_llm() -> SimpleNamespace:
    """Exposes the model where vLLM V1's in-process executor does."""
    model = RecordingModel()
    llm = SimpleNamespace(resets=0)
    llm.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=SimpleNamespace(
        worker=SimpleNamespace(model_runner=SimpleNamespace(model=model)))))

    def reset_prefix_cache():
        llm.resets += 1

    llm.reset_prefix_cache = reset_prefix_cache
    llm.model = model
    return llm

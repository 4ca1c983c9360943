"""Sampling with transformers `generate` from a Hugging Face folder (e.g. `megaqwen-convert to-hf`).

A stand-in until the serving engine lands: one `generate` call per prompt with
`num_return_sequences=n`, so prompts never need padding.
"""

from __future__ import annotations

from megaqwen.data.prompts import prompt_ids
from megaqwen.data_pipeline.verify.pairs import Generator, Task


def hf_generator(checkpoint: str, max_new_tokens: int = 512, temperature: float = 0.8, top_p: float = 0.95,
                 seed: int = 0, device: str | None = None) -> Generator:
    """A Generator sampling from `checkpoint` (temperature + nucleus); prompts rendered by
    `megaqwen.data.prompts.prompt_ids` with the folder's tokenizer (its chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).to(device).eval()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    torch.manual_seed(seed)

    def generate(tasks: list[Task], n: int) -> list[list[str]]:
        out = []
        for task in tasks:
            input_ids = torch.tensor([prompt_ids(tok, task.record)], device=device)
            with torch.no_grad():
                ids = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                     do_sample=True, temperature=temperature, top_p=top_p,
                                     max_new_tokens=max_new_tokens, num_return_sequences=n,
                                     pad_token_id=pad_id if pad_id is not None else 0)
            out.append(tok.batch_decode(ids[:, input_ids.shape[1]:], skip_special_tokens=True))
        return out

    return generate


def engine_generator(checkpoint: str, engine: str = "native", max_new_tokens: int = 512,
                     temperature: float = 0.8, top_p: float = 0.95, seed: int = 0,
                     device: str | None = None) -> Generator:
    """A Generator on a `megaqwen.generate` engine: `native` (our KV-cache decoder; `checkpoint` a run
    folder, native checkpoint or HF folder) or `vllm` (HF folder, GPU). All n samples of every task
    of a batch go in one batched `generate` call; prompts rendered by `megaqwen.data.prompts.prompt_ids`
    with the checkpoint's tokenizer (Qwen2.5's when it ships none); a sample ends at <|im_end|> or end
    of text."""
    from pathlib import Path

    import torch

    from megaqwen.generate import SamplingParams, build_engine
    from megaqwen.tokenizer import open_tokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok, _ = open_tokenizer(checkpoint if (Path(checkpoint) / "tokenizer.json").is_file() else None)
    gen = build_engine(engine, path=checkpoint, device=device)
    stops = tuple(i for i in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
                  if isinstance(i, int) and i >= 0 and i != tok.unk_token_id)
    calls = 0

    def generate(tasks: list[Task], n: int) -> list[list[str]]:
        nonlocal calls
        prompts = [ids for task in tasks for ids in [prompt_ids(tok, task.record)] * n]
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                seed=seed + calls, stop_token_ids=stops)
        calls += 1  # each batch its own seed: the run repeats with the same flags
        outs = gen.generate(prompts, params)
        texts = [tok.decode(o.token_ids, skip_special_tokens=True) for o in outs]
        return [texts[i * n:(i + 1) * n] for i in range(len(tasks))]

    return generate

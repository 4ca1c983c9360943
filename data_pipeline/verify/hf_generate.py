"""Sampling with transformers `generate` from a Hugging Face folder (e.g. `megaqwen-convert to-hf`).

A stand-in until the serving engine lands: one `generate` call per prompt with
`num_return_sequences=n`, so prompts never need padding.
"""

from __future__ import annotations

from megaqwen.data_pipeline.verify.pairs import Generator, Task


def hf_generator(checkpoint: str, max_new_tokens: int = 512, temperature: float = 0.8, top_p: float = 0.95,
                 seed: int = 0, device: str | None = None) -> Generator:
    """A Generator sampling from `checkpoint` (temperature + nucleus); prompts go through the folder's
    chat template, or are used as plain text when its tokenizer has none."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).to(device).eval()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    torch.manual_seed(seed)

    def prompt_text(task: Task) -> str:
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(task.chat, tokenize=False, add_generation_prompt=True)
        return task.prompt if task.prompt is not None else "\n".join(m["content"] for m in task.messages)

    def generate(tasks: list[Task], n: int) -> list[list[str]]:
        out = []
        for task in tasks:
            enc = tok(prompt_text(task), return_tensors="pt", add_special_tokens=False).to(device)
            with torch.no_grad():
                ids = model.generate(**enc, do_sample=True, temperature=temperature, top_p=top_p,
                                     max_new_tokens=max_new_tokens, num_return_sequences=n,
                                     pad_token_id=pad_id if pad_id is not None else 0)
            out.append(tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True))
        return out

    return generate

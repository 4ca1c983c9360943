"""Chat shards as `megaqwen-data tokenize --format sft|dpo` writes them, from token ids and masks a
test chooses (no tokenizer): the token shard with its `data_format`, and the parallel uint8 mask
shard (`PREFIX.mask`) that says which tokens are trained on."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megaqwen.data.indexed import IndexedDatasetBuilder


def write_masked_shard(prefix: Path, data_format: str, documents) -> str:
    """`documents`: (token ids, mask) pairs of equal length, in shard order (dpo: chosen, rejected,
    chosen, ...). Returns the prefix as a string (data.path)."""
    meta = {"data_format": data_format, "mask_prefix": f"{prefix.name}.mask"}
    with IndexedDatasetBuilder(prefix, meta=meta) as docs, \
            IndexedDatasetBuilder(f"{prefix}.mask", dtype=np.uint8) as masks:
        for tokens, mask in documents:
            if len(tokens) != len(mask):
                raise ValueError(f"a document of {len(tokens)} tokens with a mask of {len(mask)}")
            docs.add_document(np.asarray(tokens, dtype=np.int64))
            masks.add_document(np.asarray(mask, dtype=np.uint8))
    return str(prefix)

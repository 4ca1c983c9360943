"""Layering: the trainer and megaqwen.data never import the curation pipeline (megaqwen.data_pipeline).

Checked in a fresh interpreter, after importing the trainer's loop and running its `data.path=sample`
path (which tokenises the shipped corpus through megaqwen.data.tokenize).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from megaqwen.data.indexed import IndexedDataset

SCRIPT = """
import json, sys, types
from pathlib import Path
import megaqwen.data, megaqwen.data.readers, megaqwen.data.tokenize
import megaqwen.train.loop as loop
after_import = "megaqwen.data_pipeline" in sys.modules
out = Path(sys.argv[1])
prefix = loop.resolve_data_path("sample", out, types.SimpleNamespace(rank=0))
print(json.dumps({"after_import": after_import, "after_sample": "megaqwen.data_pipeline" in sys.modules,
                  "prefix": prefix,
                  "loaded": sorted(m for m in sys.modules if m.startswith("megaqwen.data_pipeline"))}))
"""


def test_trainer_and_data_never_import_the_pipeline(tmp_path: Path):
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert not got["after_import"] and not got["after_sample"], got["loaded"]
    ds = IndexedDataset(got["prefix"])  # the sample corpus really was tokenised, through megaqwen.data
    assert len(ds) > 300 and ds.num_tokens > 50_000

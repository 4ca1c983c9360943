"""Print `name==floor` for the dependencies whose declared lower bound CI tests (`pip -c` input).

The floors are read from the installed megaqwen's own metadata (setup.py's install_requires), so the
version CI tests at the bottom of a range is, by construction, the one setup.py declares.
"""

from __future__ import annotations

import sys
from importlib.metadata import requires

from packaging.requirements import Requirement

# The Hugging Face stack: what reads and writes our checkpoints and tokenizers, whose behaviour
# changes between releases (transformers 4.45-4.55 read a YaRN config.json as plain RoPE).
TESTED_AT_FLOOR = ("transformers", "tokenizers", "safetensors")


def floors() -> list[str]:
    out = []
    for line in requires("megaqwen") or []:
        req = Requirement(line)
        if req.marker is not None or req.name not in TESTED_AT_FLOOR:
            continue
        lows = [s.version for s in req.specifier if s.operator == ">="]
        if len(lows) != 1:
            sys.exit(f"floors.py: {req} must declare exactly one '>=' floor")
        out.append(f"{req.name}=={lows[0]}")
    missing = set(TESTED_AT_FLOOR) - {o.split("==")[0] for o in out}
    if missing:
        sys.exit(f"floors.py: setup.py declares no floor for {sorted(missing)}")
    return out


if __name__ == "__main__":
    print("\n".join(floors()))

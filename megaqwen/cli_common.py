"""What every megaqwen command shares: `--version`, and silence for warnings known to be harmless.

Each filter names the exact message and says why it is noise for us, so a new warning still shows.
"""

from __future__ import annotations

import argparse
import warnings

from megaqwen import __version__

# (message regex, category, why it is harmless here)
KNOWN_NOISE: list[tuple[str, type[Warning], str]] = [
    (r"torch\.distributed is (disabled, )?unavailable or uninitialized, assuming the intent is to "
     r"(save|load) in a single process", UserWarning,
     "DCP in a single process: exactly what a one-process run, eval and convert want"),
    (r"`broadcast_buffers` is deprecated", FutureWarning,
     "DDP in torch 2.13: the model has no buffers to synchronise, so the flag changes nothing"),
]


def version_text() -> str:
    return f"megaqwen {__version__}"


def add_version_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=version_text(),
                        help="print megaqwen's version and exit")


def silence_known_warnings() -> None:
    for message, category, _why in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)

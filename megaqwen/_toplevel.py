"""Top-level folders of the clone that must not shadow installed packages of the same name.

`kernels/`, `data_pipeline/` and `conf/` sit at the top of the repository (the agreed layout) and
install as `megaqwen.kernels`, `megaqwen.data_pipeline` and `megaqwen.conf`. But `python -m ...`,
`python -c` and `python -m pytest` put the current folder first on `sys.path`, so from the
repository root `import kernels` would find our folder before Hugging Face's `kernels` package
(which transformers >= 5.25 imports), and transformers would fail to import.

Each of those folders' `__init__.py` calls `defer_to_installed` when it is imported under its bare
top-level name. If an installed distribution provides that name, its module is loaded in our place
(sys.modules entry replaced, which the import system returns); if none does, nothing changes.
Imported as `megaqwen.<name>` (every use inside megaqwen), the call is never made.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def defer_to_installed(name: str, init_file: str) -> None:
    """Load the installed top-level module `name` in place of the repository folder `init_file` is in."""
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != repo_root]
    spec = importlib.machinery.PathFinder.find_spec(name, elsewhere)
    if spec is None or spec.loader is None:  # nothing installed under this name: keep the folder
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise

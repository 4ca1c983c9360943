"""Domain accuracy per accepted language: multilingual-e5-small zero-shot (domains.multilingual: e5)
against today's English MiniLM zero-shot, with the majority baseline, and docs/s on one core.

    OMP_NUM_THREADS=1 python benchmarks/bench_domains_multilingual.py

Labelled set: data_pipeline/samples/domain_text_multilingual.json (18 non-English languages x 8
domains, written for this check).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

from megaqwen.data_pipeline.config import DEFAULT_TAXONOMY
from megaqwen.data_pipeline.domains import ZeroShotDomains
from megaqwen.data_pipeline.embed import get_encoder, get_multilingual_encoder

SAMPLES = Path(__file__).parents[1] / "data_pipeline" / "samples"


def main() -> None:
    data = json.loads((SAMPLES / "domain_text_multilingual.json").read_text())
    e5 = get_multilingual_encoder(128, 1)
    mini = get_encoder(None, 256, 32, "transformer", 1)
    zs_e5 = ZeroShotDomains(e5, DEFAULT_TAXONOMY, query=True)
    zs_mini = ZeroShotDomains(mini, DEFAULT_TAXONOMY)
    print(f"{'lang':5} {'docs':>4} {'majority':>8} {'MiniLM(today)':>13} {'e5':>6}")
    tot = Counter()
    t_e5 = n_e5 = 0.0
    for lang, by_dom in data.items():
        texts, gold = list(by_dom.values()), list(by_dom)
        t = time.perf_counter()
        x = e5.encode(texts)
        t_e5 += time.perf_counter() - t
        n_e5 += len(texts)
        p_e5 = [d for d, _ in zs_e5.classify(x)]
        p_mini = [d for d, _ in zs_mini.classify(mini.encode(texts))]
        maj = max(Counter(gold).values()) / len(gold)
        a_e5 = np.mean([a == b for a, b in zip(p_e5, gold)])
        a_mini = np.mean([a == b for a, b in zip(p_mini, gold)])
        tot.update(n=len(gold), e5=a_e5 * len(gold), mini=a_mini * len(gold), maj=maj * len(gold))
        print(f"{lang:5} {len(gold):4d} {maj:8.0%} {a_mini:13.0%} {a_e5:6.0%}")
    n = tot["n"]
    print(f"{'all':5} {n:4d} {tot['maj'] / n:8.0%} {tot['mini'] / n:13.0%} {tot['e5'] / n:6.0%}")
    # English keeps the MiniLM path (language "en" never reaches e5): unchanged by construction
    print(f"e5 docs/s on this set (1 thread, ~40 tokens/doc): {n_e5 / t_e5:.1f}")
    long = [" ".join(by_dom.values()) * 6 for by_dom in data.values()]
    t = time.perf_counter()
    e5.encode(long)
    dt = time.perf_counter() - t
    print(f"e5 docs/s at 128 tokens/doc (the default cut, 1 thread): {len(long) / dt:.1f}")


if __name__ == "__main__":
    main()

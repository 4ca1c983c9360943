"""Regenerate `corpus.jsonl`, the sample corpus used by the README demo and the tests.

    python -m megaqwen.data_pipeline.samples.make_corpus [--out PATH] [--seed 0]

Every text is composed from the hand-written banks in `domain_text.json` with a fixed seed, so the
file is byte-for-byte reproducible. Besides ~340 decent multi-domain documents it plants records
whose fate is known: low-quality ones (id `lowq-<kind>-<i>`), exact and near duplicates
(`dup-exact-<i>`, `dup-near-<i>`, with `duplicate_of`), non-English (`lang-<code>`), documents with
e-mail addresses and IPs (`pii-<i>`) and malformed lines (broken JSON, no `text`, non-string text).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

# Hand-written sentence banks, one block per domain: slot values (`{product}`, `{city}` ...) and
# sentences that use them. Every word was written for this repository (free to redistribute).
_TEXT = json.loads((Path(__file__).with_name("domain_text.json")).read_text(encoding="utf-8"))
BANKS, GENERIC, NON_ENGLISH = _TEXT["BANKS"], _TEXT["GENERIC"], _TEXT["NON_ENGLISH"]


# documents per domain: the first three are deliberately over-represented (as on the web)
DOMAIN_COUNTS = {
    "e-commerce": 60,
    "social media": 55,
    "entertainment": 50,
    "news": 25,
    "technology": 25,
    "science": 22,
    "academic": 20,
    "code": 18,
    "math": 18,
    "health": 18,
    "law": 15,
    "finance": 18,
}
DEFAULT_OUT = Path(__file__).with_name("corpus.jsonl")


def _fill(template: str, slots: dict[str, list[str]], rng: random.Random, chosen: dict[str, str]) -> str:
    # one value per slot per document, so a review talks about one product throughout
    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key not in chosen:
            chosen[key] = rng.choice(slots[key])
        return chosen[key]

    return re.sub(r"\{(\w+)\}", sub, template)


def make_document(domain: str, rng: random.Random) -> str:
    bank = BANKS[domain]
    chosen: dict[str, str] = {}
    title = _fill(rng.choice(bank["titles"]), bank["slots"], rng, chosen)
    sentences = rng.sample(bank["sentences"], rng.randint(7, 10))
    sentences += rng.sample(GENERIC, rng.randint(5, 8))
    rng.shuffle(sentences)
    paragraphs, i = [], 0
    while i < len(sentences):
        k = rng.randint(3, 5)
        paragraphs.append(" ".join(_fill(s, bank["slots"], rng, chosen) for s in sentences[i : i + k]))
        i += k
    text = title + "\n\n" + "\n\n".join(paragraphs)
    return text[0].upper() + text[1:]


def low_quality(rng: random.Random) -> list[tuple[str, str]]:
    """(kind, text) pairs that the heuristic filters must remove."""
    out = [
        ("short", "Great product, fast shipping!"),
        ("short", "lol same"),
        ("short", "Click here."),
        ("repetition", "Buy cheap watches online today. " * 40),
        ("repetition", "\n".join(["Best deals of the year, limited stock, order now!"] * 30)),
        ("repetition", " ".join(["free shipping best price"] * 60)),
        ("symbols", "#### $$$ %%% @@@ !!! *** ### &&& ^^^ ~~~ " * 15),
        ("symbols", "\n".join(["... ... ... ### ... ###"] * 20) + "\nend"),
        (
            "lorem",
            (
                "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
                "incididunt ut labore et dolore magna aliqua. "
            )
            * 8,
        ),
        (
            "boilerplate",
            "\n".join(
                [
                    "Home",
                    "About us",
                    "Contact",
                    "Privacy policy",
                    "Terms of use",
                    "Cookie policy",
                    "This website uses cookies to improve your experience.",
                    "Accept all cookies",
                    "Subscribe to our newsletter",
                    "Follow us on social media",
                    "Copyright 2024 All rights reserved",
                    "Please enable JavaScript to view this page.",
                    "Log in",
                    "Sign up",
                    "Search",
                ]
            ),
        ),
        (
            "boilerplate",
            "\n".join(
                [
                    "Skip to main content",
                    "Menu",
                    "Shop",
                    "Cart (0)",
                    "Wishlist",
                    "Sign in",
                    "Register",
                    "Help",
                    "Returns",
                    "Sitemap",
                ]
                * 3
            ),
        ),
        ("allcaps", "BUY NOW!!! LIMITED OFFER!!! CALL TODAY!!! " * 20),
    ]
    # pad with generated spam variations so each kind appears a few times
    words = ["cheap", "deal", "click", "win", "free", "bonus", "offer", "now"]
    for i in range(14):
        kind = ["repetition", "short", "symbols", "lorem"][i % 4]
        if kind == "repetition":
            w = rng.sample(words, 3)
            out.append((kind, (" ".join(w) + " ") * rng.randint(30, 60)))
        elif kind == "short":
            out.append((kind, rng.choice(["ok", "thanks!!", "first comment", "nice pic", "+1 agreed"])))
        elif kind == "symbols":
            out.append(
                (
                    kind,
                    " ".join(
                        rng.choice(["@@", "##", "$$", "%%", "&&", "==>", "|||", "1"])
                        for _ in range(rng.randint(80, 200))
                    ),
                )
            )
        else:
            out.append((kind, ("lorem ipsum dolor sit amet " * rng.randint(20, 40)).strip()))
    return out


def near_duplicate(text: str, rng: random.Random) -> str:
    """A light edit of `text`: swap two words and append a short line (Jaccard stays > 0.85)."""
    words = text.split(" ")
    for _ in range(2):
        j = rng.randrange(len(words))
        words[j] = rng.choice(["really", "quite", "very", "truly"])
    return " ".join(words) + "\n\n(Updated to fix a typo.)"


PII_LINES = [
    "Questions and corrections can be sent to {user}@example.com, and I reply within a week.",
    "The staging server answered on 192.168.{a}.{b} while the public one was still down.",
    "Contact the press office at press.{user}@news-example.org or call the switchboard.",
    "Our logs showed repeated requests from 203.0.113.{b}, which we have since blocked.",
]


def make_records(seed: int = 0) -> list[str]:
    """The corpus as JSONL lines (malformed ones included), in a fixed shuffled order."""
    rng = random.Random(seed)
    records: list[dict] = []
    for domain, count in DOMAIN_COUNTS.items():
        for _ in range(count):
            records.append({"text": make_document(domain, rng), "domain_hint": domain})
    rng.shuffle(records)
    for i, r in enumerate(records):
        r["id"] = f"doc-{i:04d}"
    good = list(records)

    for i, (kind, text) in enumerate(low_quality(rng)):
        records.append({"id": f"lowq-{kind}-{i}", "text": text})
    for i, src in enumerate(rng.sample(good, 8)):
        records.append({"id": f"dup-exact-{i}", "text": src["text"], "duplicate_of": src["id"]})
    for i, src in enumerate(rng.sample(good, 8)):
        records.append(
            {"id": f"dup-near-{i}", "text": near_duplicate(src["text"], rng), "duplicate_of": src["id"]}
        )
    for code, text in NON_ENGLISH.items():
        records.append({"id": f"lang-{code}", "text": text})
    for i in range(6):
        domain = rng.choice(list(DOMAIN_COUNTS))
        line = rng.choice(PII_LINES).format(
            user=rng.choice(["jane.doe", "m.chen", "editor", "ops-team"]),
            a=rng.randint(0, 255),
            b=rng.randint(1, 254),
        )
        records.append(
            {"id": f"pii-{i}", "text": make_document(domain, rng) + "\n\n" + line, "domain_hint": domain}
        )

    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    lines += [
        '{"id": "bad-json-0", "text": "this line was cut off in the middle of a wri',
        "not json at all, just a stray log line",
        '{"id": "bad-notext-0", "body": "the text key is missing"}',
        '{"id": "bad-type-0", "text": 42}',
        '{"id": "bad-type-1", "text": null}',
        '["a", "json", "array", "not", "an", "object"]',
        '{"id": "bad-json-1", "text": "trailing comma",}',
    ]
    # interleave so malformed and planted records are spread through every input shard
    rng.shuffle(lines)
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    lines = make_records(args.seed)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} lines, {args.out.stat().st_size / 1e6:.2f} MB to {args.out}")


if __name__ == "__main__":
    main()

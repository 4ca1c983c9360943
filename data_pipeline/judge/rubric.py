"""The judge's rubric: one prompt per (document, dimension), answered with a single digit 0-5."""

from __future__ import annotations

SCORE_TOKENS = ["0", "1", "2", "3", "4", "5"]  # single tokens in the Qwen vocabulary

SYSTEM = (
    "You are a careful annotator of pre-training data for language models. You rate documents "
    "strictly according to the rubric and answer with one digit."
)

DIMENSIONS: dict[str, tuple[str, str]] = {
    "educational_value": (
        "educational value",
        "0: no educational value (spam, navigation, ads).\n"
        "1: some relevant information buried in promotional or off-topic text.\n"
        "2: touches on useful topics but superficially or disorganised.\n"
        "3: clear, coherent introduction to a topic, suitable for learning.\n"
        "4: highly relevant, well-organised teaching material with examples.\n"
        "5: outstanding textbook-quality explanation with depth and clarity.",
    ),
    "knowledge_density": (
        "factual and knowledge density",
        "0: no facts or knowledge at all.\n"
        "1: a few trivial or unverifiable claims.\n"
        "2: some facts diluted by filler or opinion.\n"
        "3: a fair amount of concrete, checkable information.\n"
        "4: dense with precise facts, figures, definitions or reasoning.\n"
        "5: exceptionally dense, precise and specialised knowledge.",
    ),
    "coherence": (
        "coherence and writing quality",
        "0: unreadable (garbled, fragments, keyword lists).\n"
        "1: mostly incoherent or badly broken text.\n"
        "2: understandable but poorly structured or error-ridden.\n"
        "3: coherent, grammatical prose with a clear thread.\n"
        "4: well-written and well-structured.\n"
        "5: polished, professional writing.",
    ),
    "safety": (
        "safety (5 is safest)",
        "0: explicit harmful content (violence, abuse, illegal instructions).\n"
        "1: strongly offensive or hateful content.\n"
        "2: crude, toxic or adult content.\n"
        "3: mildly inappropriate passages.\n"
        "4: harmless with minor concerns.\n"
        "5: completely safe for all audiences.",
    ),
}


def check_dimensions(dims: list[str]) -> None:
    bad = [d for d in dims if d not in DIMENSIONS]
    if bad:
        raise ValueError(f"unknown judge dimension(s) {bad}; known: {sorted(DIMENSIONS)}")


def quality_messages(text: str, dimension: str, max_chars: int) -> list[dict[str, str]]:
    title, scale = DIMENSIONS[dimension]
    doc = text[:max_chars]
    user = (
        f"Rate the document below for {title} on a scale from 0 to 5.\n\nRubric:\n{scale}\n\n"
        f"Document:\n<document>\n{doc}\n</document>\n\n"
        f"Answer with a single digit from 0 to 5 and nothing else."
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def domain_letters(n: int) -> list[str]:
    if n > 26:
        raise ValueError(f"the judge's domain prompt labels options A-Z; the taxonomy has {n} domains")
    return [chr(ord("A") + i) for i in range(n)]


def domain_messages(text: str, taxonomy: dict[str, str], max_chars: int) -> list[dict[str, str]]:
    letters = domain_letters(len(taxonomy))
    options = "\n".join(f"{c}: {name} ({desc})" for c, (name, desc) in zip(letters, taxonomy.items()))
    user = (
        f"Which domain does the document below belong to?\n\nOptions:\n{options}\n\n"
        f"Document:\n<document>\n{text[:max_chars]}\n</document>\n\n"
        f"Answer with the letter of one option and nothing else."
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]

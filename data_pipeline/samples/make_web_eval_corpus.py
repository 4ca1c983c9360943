"""A second labelled corpus, written apart from `eval_corpus.jsonl` (other templates, other words),
to check the maths / junk / forum rules on text they were not tuned on.

    python -m megaqwen.data_pipeline.samples.make_web_eval_corpus --out web_eval.jsonl [--seed 1]
    python -m megaqwen.data_pipeline.samples.evaluate_corpus --corpus web_eval.jsonl

Records use `evaluate_corpus.py`'s labels (`kind`, `content`, `lang`, `genre` / `junk`). Sentences are
built from slot templates (subject x verb x object x place), so no two documents share a sentence by
construction and the repetition rules see natural text. Contents: prose in en, de, fr, es, ru, zh
(including traps for the new rules: a cookie recipe, a consent form, a JavaScript article, headings
in capitals), forum threads with "X replied:" lines, maths with inline `$...$` / `\\(...\\)` and
display `$$...$$` / `\\[...\\]` equations and worked solutions, Python / JavaScript code, and junk:
capitals-only pages, cookie / consent / JavaScript notices, link farms, keyword lists, symbol soup,
placeholder text.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# ---- prose: per language, slot templates {s} subject {v} verb phrase {o} object {p} place ------------
PROSE = {
    "en": {
        "s": [
            "The harbour committee",
            "A retired carpenter",
            "Our neighbourhood choir",
            "The county library",
            "A group of volunteers",
            "The ferry operator",
            "Local beekeepers",
            "The primary school",
        ],
        "v": [
            "has quietly restored",
            "is planning to repaint",
            "spent the winter repairing",
            "finally reopened",
            "asked the council to protect",
            "started a fund for",
        ],
        "o": [
            "the old lighthouse",
            "a wooden footbridge",
            "the community orchard",
            "the village bakery",
            "an abandoned railway station",
            "the tidal swimming pool",
            "the painted bandstand",
        ],
        "p": [
            "near the river mouth",
            "on the edge of town",
            "behind the market square",
            "at the end of the coastal path",
            "next to the bus depot",
            "below the chalk cliffs",
        ],
        "t": [
            "{s} {v} {o} {p}.",
            "According to residents, {s2} {v} {o} {p}.",
            "Last month {s2} {v} {o}, and the work should be finished by spring.",
            "Few people expected that {s2} {v} {o} {p}, but it happened anyway.",
            "Photos from the opening show how {s2} {v} {o} {p}.",
            "Nobody could say why {s2} {v} {o} so late.",
        ],
        "titles": ["Around the Bay", "Community Notes", "What Changed This Year"],
    },
    "de": {
        "s": [
            "Der Heimatverein",
            "Eine pensionierte Lehrerin",
            "Die Feuerwehr des Dorfes",
            "Der Bäcker am Markt",
            "Eine Gruppe von Studenten",
            "Die Gemeindeverwaltung",
        ],
        "v": [
            "hat im Winter renoviert",
            "möchte bald erweitern",
            "will unbedingt erhalten",
            "hat endlich wieder geöffnet",
            "plant seit Jahren",
            "pflegt mit viel Geduld",
        ],
        "o": [
            "die alte Mühle",
            "den Spielplatz",
            "das kleine Museum",
            "die Holzbrücke",
            "den Obstgarten",
            "das alte Freibad",
        ],
        "p": [
            "am Rand der Stadt",
            "hinter dem Bahnhof",
            "neben der Kirche",
            "an der Uferstraße",
            "unter den Linden",
            "oben am Hang",
        ],
        "t": [
            "{s} {v} {o} {p}.",
            "Nach Angaben der Anwohner ist das Projekt {p} sehr beliebt, und {s2} {v} {o}.",
            "Im letzten Monat hat man gesehen, dass {s2} {o} {p} nicht vergessen hat.",
            "Viele fragen sich, ob {s2} {o} auch im nächsten Jahr pflegen wird.",
            "Auf den Fotos sieht man, wie stolz {s2} auf {o} ist.",
            "Seit dem Sommer {v} {s2} {o} {p}.",
        ],
        "titles": ["Aus der Region", "Neues aus dem Dorf"],
    },
    "fr": {
        "s": [
            "Le comité du quartier",
            "Une ancienne infirmière",
            "La chorale municipale",
            "Le boulanger du port",
            "Un groupe de bénévoles",
            "La mairie",
        ],
        "v": [
            "a restauré pendant l'hiver",
            "souhaite agrandir",
            "veut protéger",
            "a enfin rouvert",
            "prépare depuis longtemps",
            "entretient avec patience",
        ],
        "o": [
            "le vieux moulin",
            "la passerelle en bois",
            "le jardin partagé",
            "la petite gare",
            "le lavoir",
            "le kiosque à musique",
        ],
        "p": [
            "au bord de la rivière",
            "derrière la place du marché",
            "à la sortie du village",
            "près de l'école",
            "sous les tilleuls",
            "en haut de la colline",
        ],
        "t": [
            "{s} {v} {o} {p}.",
            "Selon les habitants, {s2} {v} {o} {p}.",
            "Le mois dernier, {s2} {v} {o}, et les travaux seront finis au printemps.",
            "Personne ne pensait que {s2} {v} {o} {p}, mais c'est arrivé.",
            "Sur les photos, on voit comment {s2} {v} {o}.",
            "Depuis l'été, {s2} {v} aussi {o} {p}.",
        ],
        "titles": ["Vie locale", "Nouvelles du quartier"],
    },
    "es": {
        "s": [
            "La asociación de vecinos",
            "Una maestra jubilada",
            "El coro del barrio",
            "La biblioteca municipal",
            "Un grupo de voluntarios",
            "El ayuntamiento",
        ],
        "v": [
            "ha restaurado durante el invierno",
            "quiere ampliar",
            "pretende proteger",
            "por fin ha reabierto",
            "lleva años preparando",
            "cuida con paciencia",
        ],
        "o": [
            "el viejo molino",
            "el puente de madera",
            "el huerto comunitario",
            "la pequeña estación",
            "la piscina natural",
            "el quiosco de música",
        ],
        "p": [
            "junto al río",
            "detrás de la plaza del mercado",
            "a la salida del pueblo",
            "cerca del colegio",
            "bajo los tilos",
            "en lo alto de la colina",
        ],
        "t": [
            "{s} {v} {o} {p}.",
            "Según los vecinos, {s2} {v} {o} {p}.",
            "El mes pasado {s2} {v} {o}, y las obras terminarán en primavera.",
            "Nadie esperaba que {s2} {v} {o} {p}, pero así fue.",
            "En las fotos se ve cómo {s2} {v} {o}.",
            "Desde el verano, {s2} también {v} {o} {p}.",
        ],
        "titles": ["Vida local", "Noticias del barrio"],
    },
    "ru": {
        "s": [
            "Совет жителей",
            "Пожилой плотник",
            "Городской хор",
            "Районная библиотека",
            "Группа волонтёров",
            "Администрация посёлка",
        ],
        "v": [
            "отремонтировал за зиму",
            "собирается расширить",
            "хочет сохранить",
            "наконец открыл снова",
            "давно готовит",
            "терпеливо бережёт",
        ],
        "o": [
            "старую мельницу",
            "деревянный мост",
            "общий сад",
            "маленький вокзал",
            "летний бассейн",
            "старую беседку",
        ],
        "p": [
            "у реки",
            "за рыночной площадью",
            "на окраине города",
            "рядом со школой",
            "под липами",
            "на вершине холма",
        ],
        "t": [
            "{s} {v} {o} {p}.",
            "По словам жителей, {s2} {v} {o} {p}.",
            "В прошлом месяце {s2} {v} {o}, и работы закончатся весной.",
            "Никто не ожидал, что {s2} {v} {o} {p}, но так и случилось.",
            "На фотографиях видно, как {s2} {v} {o}.",
            "С начала лета {s2} {v} и {o} {p}.",
        ],
        "titles": ["Жизнь района", "Новости посёлка"],
    },
    "zh": {
        "s": ["社区委员会", "一位退休的木匠", "镇上的合唱团", "县图书馆", "一群志愿者", "当地的养蜂人"],
        "v": [
            "在冬天修复了",
            "打算重新粉刷",
            "花了很多时间整理",
            "终于重新开放了",
            "请求政府保护",
            "耐心地照料着",
        ],
        "o": ["河边的老灯塔", "一座木桥", "社区果园", "村口的面包店", "废弃的火车站", "公园里的音乐亭"],
        "p": ["在河口附近", "在小镇的边上", "在市场后面", "在公交站旁边", "在菩提树下", "在山坡上"],
        "t": [
            "{s}{p}{v}{o}。",
            "据居民说，{s2}{p}{v}{o}。",
            "上个月{s2}{v}{o}，工程预计在春天完成。",
            "很少有人想到{s2}会{v}{o}，但这件事确实发生了。",
            "从照片上可以看出{s2}多么用心地对待{o}。",
            "从夏天开始，{s2}{p}也{v}{o}。",
        ],
        "titles": ["社区新闻", "本地生活"],
    },
}


def _sentences(lang: str, rng: random.Random, n: int) -> list[str]:
    """`n` sentences, each template and each slot word at most once (lists run out: they are reused)."""
    b = PROSE[lang]
    pools = {k: rng.sample(b[k], len(b[k])) for k in ("s", "v", "o", "p", "t")}
    out = []
    for i in range(n):
        s, v, o, p, t = (pools[k][i % len(pools[k])] for k in ("s", "v", "o", "p", "t"))
        s2 = s if lang in ("de", "zh") else s[0].lower() + s[1:]
        out.append(t.format(s=s, s2=s2, v=v, o=o, p=p))
    return out


def _sentence(lang: str, rng: random.Random) -> str:
    return _sentences(lang, rng, 1)[0]


def prose(lang: str, rng: random.Random) -> str:
    sents = _sentences(lang, rng, 6)
    sep = "" if lang == "zh" else " "
    k = len(sents) // 2
    return rng.choice(PROSE[lang]["titles"]) + "\n\n" + sep.join(sents[:k]) + "\n\n" + sep.join(sents[k:])


# traps for the new rules: clean English pages that mention cookies, consent, JavaScript, or use capitals
TRAPS = [
    "Chewy Oat Cookies\n\nThese oat cookies keep for a week in a tin. {a}\n\nCream the butter and sugar "
    "until pale, then beat in the egg. Fold in the oats, flour and raisins. Bake the cookies for twelve "
    "minutes, until the edges are golden. Let the cookies cool on the tray before you move them. {b}",
    "Informed Consent in Clinical Trials\n\n{a} Every participant must give written consent before the first "
    "visit, and the form explains the risks in plain language. Consent can be withdrawn at any time "
    "without giving a reason. {b} The ethics board checks that the consent process was followed.",
    "Why JavaScript Still Runs the Web\n\nJavaScript began as a small scripting language for browsers. {a} "
    "Today JavaScript runs on servers, phones and even small devices. Many teams now write TypeScript, "
    "which adds types to JavaScript and catches mistakes before the code ships. {b}",
    "NASA AND ESA PLAN A JOINT MISSION\n\nThe US and European space agencies (NASA and ESA) said on Monday "
    "that they will share the cost of a new probe. {a} The probe will carry instruments built in the UK, "
    "the USA and Japan. {b} Engineers expect the launch window to open in the autumn of next year.",
]


def trap(rng: random.Random) -> str:
    a, b = _sentences("en", rng, 2)
    return rng.choice(TRAPS).format(a=a, b=b)


NAMES = ["marta_k", "Jonas B.", "old_sailor", "Priya", "tomtom88", "Dr. Reyes", "kat_in_hat", "Ben"]
REPLY_VERBS = ["replied", "wrote", "said", "posted"]
FORUM_LINES = [
    "I had the same problem with my bike chain last week and a bit of oil fixed it.",
    "Have you tried checking the tyre pressure before every long ride?",
    "Thanks, that worked for me too, although it took a couple of attempts.",
    "My local shop charges far too much for a simple brake adjustment, in my opinion.",
    "It depends on the weather; in winter I always switch to thicker tyres.",
    "Could you post a photo of the gear so we can see what is going on?",
    "I would not ride on that rim again until a mechanic has looked at it.",
    "Good point, I forgot that the older frames use a different bottom bracket.",
    "Same here, the squeaking stopped after I cleaned the pads with some alcohol.",
    "Do you know whether the warranty covers the cable if it snaps in the first year?",
]


def forum(rng: random.Random) -> tuple[str, list[str]]:
    q = "Strange clicking noise from the pedals\n\n" + " ".join(_sentences("en", rng, 2))
    lines = rng.sample(FORUM_LINES, 6)
    parts, attributions = [q], []
    for i in range(0, 6, 2):
        who = rng.choice(NAMES)
        att = f"{who} {rng.choice(REPLY_VERBS)}:"
        attributions.append(att)
        parts.append(att + "\n" + lines[i] + " " + lines[i + 1])
    return "\n\n".join(parts), attributions


# ---- maths -------------------------------------------------------------------------------------------
def math_inline(rng: random.Random) -> str:
    a, b, c = rng.randint(2, 9), rng.randint(2, 20), rng.randint(1, 9)
    style = rng.choice(["dollar", "paren"])
    o, e = ("$", "$") if style == "dollar" else ("\\(", "\\)")
    x = rng.choice("xyt")
    return (
        f"Solving a linear equation step by step\n\n"
        f"Suppose a shop sells notebooks at a fixed price and a bag costs {c} pounds. We want the price "
        f"{o}{x}{e} of one notebook when {o}{a}{x} + {c} = {a * b + c}{e}. "
        f"First we subtract {o}{c}{e} from both "
        f"sides, which leaves {o}{a}{x} = {a * b}{e}. Then we divide both sides by {o}{a}{e} and find "
        f"{o}{x} = {b}{e}. To check the answer we put {o}{x} = {b}{e} back into the left side: "
        f"{o}{a} \\cdot {b} + {c} = {a * b + c}{e}, which matches the right side.\n\n"
        f"The same method works for any equation of the form {o}p{x} + q = r{e} with {o}p \\neq 0{e}: "
        f"the solution is {o}{x} = (r - q)/p{e}. Try it yourself "
        f"with {o}{a + 1}{x} - {c} = {a + 1}{e} before "
        f"reading the next section, where we look at two unknowns."
    )


def math_display(rng: random.Random) -> str:
    n = rng.randint(3, 12)
    k = rng.randint(2, 5)
    style = rng.choice(["dollar", "bracket"])
    o, e = ("$$", "$$") if style == "dollar" else ("\\[", "\\]")
    return (
        f"A worked example: the sum of the first {n} odd numbers\n\n"
        f"We claim that adding the first {n} odd numbers gives a perfect square. Written out, the claim is\n"
        f"{o}\\sum_{{i=1}}^{{{n}}} (2i - 1) = {n}^2 = {n * n}.{e}\n"
        f"The proof splits the sum into two simpler sums. The first part counts twice the integers up to "
        f"{n}, and the second part subtracts one for every term:\n"
        f"{o}\\sum_{{i=1}}^{{{n}}} 2i - \\sum_{{i=1}}^{{{n}}} 1 "
        f"= 2 \\cdot \\frac{{{n}({n}+1)}}{{2}} - {n}.{e}\n"
        f"Simplifying the right-hand side gives {n * (n + 1)} minus {n}, which is exactly {n * n}. "
        f"A picture helps as well: each odd number adds an L-shaped border to a square of dots.\n"
        f"{o}({n}+{k})^2 - {n}^2 = {k} \\cdot (2 \\cdot {n} + {k}).{e}\n"
        f"This last identity shows how many dots the next {k} borders add, and it gives a quick way to "
        f"check the table of squares in the exercises."
    )


def math_worked(rng: random.Random) -> str:
    a, b = rng.randint(2, 6), rng.randint(1, 9)
    return (
        f"Exercise {rng.randint(1, 40)}. Find the derivative of $f(x) = {a}x^3 - {b}x + \\sin x$.\n\n"
        f"Solution. We differentiate term by term. The power rule gives "
        f"$\\frac{{d}}{{dx}} {a}x^3 = {3 * a}x^2$, the linear term contributes $-{b}$, and the derivative of "
        f"the sine is the cosine. Therefore\n\\[ f'(x) = {3 * a}x^2 - {b} + \\cos x. \\]\n"
        f"At the origin this is $f'(0) = 1 - {b} = {1 - b}$, so the graph is "
        f"{'falling' if b > 1 else 'flat'} there. For the second derivative we repeat the process and "
        f"obtain $f''(x) = {6 * a}x - \\sin x$, which vanishes at $x = 0$; the origin is therefore a "
        f"candidate for an inflection point, and a sign check on either side confirms it."
    )


def math_steps(rng: random.Random) -> str:
    """A derivation in many short steps: the prose between equations repeats ("Then", "so")."""
    a, b, c = rng.randint(2, 7), rng.randint(2, 9), rng.randint(1, 5)
    steps = [
        f"Then $({a}x + {b})^2 = {a * a}x^2 + {2 * a * b}x + {b * b}$.",
        f"So $\\int_0^{c} ({a}x + {b})\\,dx = {a * c * c / 2:g} + {b * c}$.",
        f"Then $g(x) = {a}x^2 - {b}$ and so $g'(x) = {2 * a}x$.",
        f"So $g'({c}) = {2 * a * c}$.",
        f"Then $\\lim_{{x \\to 0}} \\frac{{\\sin {a}x}}{{x}} = {a}$.",
        f"So $h(x) = e^{{{a}x}}$ gives $h'(x) = {a}e^{{{a}x}}$.",
        f"Then $\\sum_{{k=0}}^{{{b}}} k = {b * (b + 1) // 2}$.",
        f"So $\\binom{{{b}}}{{2}} = {b * (b - 1) // 2}$.",
    ]
    rng.shuffle(steps)
    return (
        f"Quick drill {rng.randint(1, 99)}: a chain of small results\n\n"
        "Each line below uses the previous one or a standard rule, and the point of the drill is speed, so "
        "the explanations are kept short.\n\n" + "\n".join(steps) + "\n\n"
        "If a line looks wrong, redo it by hand before moving on to the next drill."
    )


def math_sparse(rng: random.Random) -> str:
    """Mostly prose with a few inline equations: below the old character-share threshold."""
    r, n, p = rng.choice([3, 4, 5, 6]), rng.randint(5, 30), rng.choice([500, 1000, 2500])
    sents = _sentences("en", rng, 2)
    return (
        f"How compound interest really grows\n\n{sents[0]} Money left in a savings account grows faster than "
        f"most people expect, because each year's interest itself earns interest. If you deposit {p} pounds "
        f"at a rate of {r} per cent, the balance after $n$ years is $B = {p}(1 + {r / 100:g})^n$. After {n} "
        f"years that is about {round(p * (1 + r / 100) ** n)} pounds, while simple interest would have given "
        f"only {p + p * r * n // 100} pounds.\n\nThe difference looks small in the first few years and large "
        f"later on, which is why advisers tell young savers to start early. A handy shortcut is the rule of "
        f"seventy-two: divide 72 by the rate to estimate the doubling time, here $72 / {r} = {72 / r:.1f}$ "
        f"years. {sents[1]} The rule is only an approximation, but it is good enough for planning."
    )


# ---- code --------------------------------------------------------------------------------------------
def code(rng: random.Random) -> str:
    name = rng.choice(["tally_votes", "merge_ranges", "parse_header", "rolling_mean", "group_by_day"])
    n = rng.randint(2, 9)
    if rng.random() < 0.5:
        return (
            f'"""Helpers for the {name.replace("_", " ")} report."""\n\nfrom '
            f"collections import defaultdict\n\n\n"
            f"def {name}(rows, width={n}):\n    out = defaultdict(list)\n    for key, value in rows:\n"
            f"        out[key].append(value)\n        if len(out[key]) "
            f"> width:\n            out[key].pop(0)\n"
            f"    return {{k: sum(v) / len(v) for k, v in out.items()}}\n\n\n"
            f"def test_{name}():\n    rows = [('a', 1), ('a', 3), ('b', {n})]\n"
            f"    assert {name}(rows)['a'] == 2\n"
        )
    camel = "".join(w.capitalize() for w in name.split("_"))
    return (
        f"// {camel}: keeps the last {n} values per key\n"
        f"export function {camel[0].lower() + camel[1:]}(rows, width = {n}) {{\n  const out = new Map();\n"
        f"  for (const [key, value] of rows) {{\n    const list = out.get(key) ?? [];\n"
        f"    list.push(value);\n"
        f"    if (list.length > width) list.shift();\n    out.set(key, list);\n  }}\n"
        f"  return out;\n}}\n"
    )


# ---- junk --------------------------------------------------------------------------------------------
def junk_caps(rng: random.Random) -> str:
    return "\n\n".join(s.upper() for s in _sentences("en", rng, 6)) + (
        "\n\nCALL NOW!!! LIMITED OFFER, FREE SHIPPING ON EVERY ORDER TODAY ONLY."
    )


NOTICES = [
    "We use cookies and similar tracking technologies to personalise content and ads.",
    "By clicking Accept all you consent to the use of cookies by us and our partners.",
    "You can manage preferences or withdraw your consent at any time in the privacy settings.",
    "Please enable JavaScript in your browser to view this page correctly.",
    "JavaScript is disabled. Some features of this site will not work without it.",
    "Our partners process data on the basis of legitimate interest; you can object to this.",
    "Reject all | Accept all | Manage options",
    "Cookie policy · Privacy policy · Terms of use",
    "Your browser is out of date. Update it for more security and speed.",
    "Checking your browser before accessing the site. This takes a few seconds.",
    "Subscribe to our newsletter for weekly deals and updates.",
    "© 2024 Example Media Group. All rights reserved.",
]


def junk_notice(rng: random.Random) -> str:
    lines = rng.sample(NOTICES, rng.randint(6, 9))
    if rng.random() < 0.5:  # a little real text next to the notices
        lines.insert(rng.randint(0, len(lines)), _sentence("en", rng))
    return "\n".join(lines)


def junk_links(rng: random.Random) -> str:
    words = ["cheap", "flights", "hotel", "deals", "best", "price", "loans", "casino", "bonus", "free"]
    return "\n".join(
        " ".join(rng.sample(words, 3)).title() + " | " + " ".join(rng.sample(words, 2))
        for _ in range(rng.randint(15, 30))
    )


def junk_keywords(rng: random.Random) -> str:
    words = ["buy", "shoes", "online", "cheap", "sale", "discount", "running", "boots", "women", "men"]
    return ", ".join(rng.choice(words) for _ in range(rng.randint(120, 200)))


def junk_symbols(rng: random.Random) -> str:
    return "\n".join(
        "".join(rng.choice("#*=~|<>^%&@") for _ in range(rng.randint(20, 60))) for _ in range(20)
    )


def junk_placeholder(rng: random.Random) -> str:
    return ("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * rng.randint(6, 12)).strip()


def junk_caps_de(rng: random.Random) -> str:
    return "\n\n".join(s.upper() for s in _sentences("de", rng, 6))


CLEAN = {"prose": 0, "trap": 0, "forum": 0, "inline": 0, "display": 0, "worked": 0, "code": 0}


def build(
    seed: int = 1, n_prose: int = 25, n_math: int = 30, n_code: int = 20, n_junk: int = 14
) -> list[dict]:
    """Records with labels, shuffled; `n_*` per language / per maths genre / per junk kind."""
    rng = random.Random(seed)
    recs: list[dict] = []

    def add(kind: str, text: str, **label) -> None:
        recs.append({"id": f"web-{kind}-{len(recs)}", "text": text, "label": {"kind": kind, **label}})

    for lang in PROSE:
        for _ in range(n_prose):
            add("clean", prose(lang, rng), content="prose", lang=lang, genre="article")
    for _ in range(n_prose):
        add("clean", trap(rng), content="prose", lang="en", genre="trap")
    for _ in range(n_prose):
        text, atts = forum(rng)
        add("clean", text, content="prose", lang="en", genre="forum", attributions=atts)
    for genre, fn in (
        ("inline_math", math_inline),
        ("display_math", math_display),
        ("worked", math_worked),
        ("stepwise", math_steps),
        ("sparse_inline", math_sparse),
    ):
        for _ in range(n_math):
            add("clean", fn(rng), content="math", lang="en", genre=genre)
    for _ in range(n_code):
        add("clean", code(rng), content="code", lang="en")
    for kind, fn in (
        ("all_caps", junk_caps),
        ("all_caps_de", junk_caps_de),
        ("notices", junk_notice),
        ("link_farm", junk_links),
        ("keywords", junk_keywords),
        ("symbols", junk_symbols),
        ("placeholder", junk_placeholder),
    ):
        for _ in range(n_junk):
            add("junk", fn(rng), content="prose", lang="en", junk=kind)
    rng.shuffle(recs)
    return recs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    recs = build(args.seed)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    print(f"{len(recs)} records -> {args.out}")


if __name__ == "__main__":
    main()

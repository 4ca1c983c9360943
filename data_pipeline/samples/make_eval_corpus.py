"""Regenerate `eval_corpus.jsonl`: a labelled multi-domain corpus to measure the filters against.

    python -m megaqwen.data_pipeline.samples.make_eval_corpus [--out PATH] [--seed 0]

Every text comes from the hand-written banks in `eval_text.json` (written for this repository) and a
fixed seed, so the file is reproducible. Each record has `id`, `text` and a `label`:
`kind` (clean / junk / duplicate), `content` (prose / code / math), `lang`, and for planted PII the
exact strings (`pii: [{type, value}]`); `traps` lists look-alikes that must survive (version strings,
dates, loopback addresses). Records carry no file name or language field: the pipeline has to tell
code from prose by the text alone.

Contents: prose in en, de, es, fr, ru, zh, ja (news, forum threads); raw Python, JavaScript, Go and
SQL files; Markdown tutorials with Python / JavaScript code (English and German prose); LaTeX sources,
web pages with inline `$...$` math and plain-text math; planted junk of 17 kinds; exact and near
duplicates; documents with e-mails, phones (8 regions, several formats), IPv4 / IPv6 addresses and
API keys.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
from pathlib import Path

_T = json.loads((Path(__file__).with_name("eval_text.json")).read_text(encoding="utf-8"))
DEFAULT_OUT = Path(__file__).with_name("eval_corpus.jsonl")
LANGS = ["en", "de", "es", "fr", "ru", "zh", "ja"]
SEP = {"zh": "", "ja": ""}


def _prose(lang: str, rng: random.Random, n: int | None = None) -> str:
    sents = rng.sample(_T["PROSE"][lang], n or rng.randint(7, 10))
    sep = SEP.get(lang, " ")
    k = len(sents) // 2
    return rng.choice(_T["TITLES"][lang]) + "\n\n" + sep.join(sents[:k]) + "\n\n" + sep.join(sents[k:])


def _forum(lang: str, rng: random.Random) -> str:
    users = ["mike_r", "anna.k", "toolbox42", "greenleaf", "j_schmidt", "river_runner"]
    parts = [rng.choice(_T["TITLES"][lang])]
    posts = rng.randint(3, 4)
    pool = rng.sample(_T["PROSE"][lang], 2 * posts)  # no sentence twice in a thread
    for k in range(posts):
        u = rng.choice(users)
        parts.append(f"{u} wrote:\n" + SEP.get(lang, " ").join(pool[2 * k : 2 * k + 2]) + "\nReply")
    return "\n\n".join(parts)


def _python_file(rng: random.Random) -> str:
    imports = "\n".join(sorted(rng.sample(_T["PY_IMPORTS"], 4)))
    funcs = rng.sample(_T["PY_FUNCS"], rng.randint(3, 5))
    doc = '"""Small utilities used by the reporting scripts."""\n\n'
    return (
        doc
        + imports
        + "\n\n\n"
        + "\n\n".join(funcs)
        + ("\n\n" + rng.choice(_T["PY_MAIN"]) if rng.random() < 0.6 else "")
    )


def _js_file(rng: random.Random) -> str:
    imports = "\n".join(rng.sample(_T["JS_IMPORTS"], 2))
    return imports + "\n\n" + "\n".join(rng.sample(_T["JS_FUNCS"], rng.randint(3, 4)))


def _tutorial(rng: random.Random, german: bool) -> str:
    bank = _T["TUTORIAL_INTRO_DE" if german else "TUTORIAL_INTRO"]
    lang, funcs = rng.choice([("python", _T["PY_FUNCS"]), ("javascript", _T["JS_FUNCS"])])
    title = "# " + (
        "Eine kleine Hilfsfunktion" if german else rng.choice(["A small helper", "Writing a utility"])
    )
    pool = rng.sample(bank, 6 if len(bank) >= 7 else len(bank))
    out = [title, " ".join(pool[:2])]
    for k, f in enumerate(rng.sample(funcs, 2)):
        out += [f"```{lang}\n{f.rstrip()}\n```", " ".join(pool[2 + 2 * k : 4 + 2 * k])]
    return "\n\n".join(out)


def _latex(rng: random.Random) -> str:
    a, b, n = rng.randint(2, 9), rng.randint(2, 9), rng.randint(3, 12)
    pool = rng.sample(_T["MATH_PROSE"], 5)
    return "\n".join(
        [
            r"\documentclass{article}",
            r"\usepackage{amsmath,amsthm}",
            r"\newtheorem{theorem}{Theorem}",
            r"\begin{document}",
            r"\section{A bound on the partial sums}",
            " ".join(pool[:2]),
            r"\begin{theorem}",
            f"For every integer $n \\geq {n}$ we have",
            r"\begin{equation}",
            f"  \\sum_{{k=1}}^{{n}} \\frac{{{a}}}{{k^{b}}} \\leq {a} \\zeta({b}).",
            r"\end{equation}",
            r"\end{theorem}",
            r"\begin{proof}",
            " ".join(pool[2:5]),
            f"Since $\\frac{{{a}}}{{k^{b}}} > 0$ for all $k$, the partial sums increase and are bounded by "
            f"$\\int_1^\\infty {a} x^{{-{b}}}\\,dx + {a}$.",
            r"\end{proof}",
            r"\end{document}",
            "",
        ]
    )


def _web_math(rng: random.Random) -> str:
    a, b, c = rng.randint(2, 9), rng.randint(1, 20), rng.randint(21, 60)
    x = (c - b) / a
    pool = rng.sample(_T["MATH_PROSE"], 5)
    parts = [
        f"Solve the equation ${a}x + {b} = {c}$ for $x$.",
        f"Subtracting {b} from both sides gives ${a}x = {c - b}$, and dividing by {a} we get $x = {x:g}$.",
        " ".join(pool[:3]),
        f"For the quadratic $f(x) = x^2 - {a + b}x + {a * b}$ the roots are $x_1 = {a}$ and $x_2 = {b}$, "
        f"because $f(x) = (x - {a})(x - {b})$.",
        f"$$\\int_0^{{{a}}} x^2 \\, dx = \\frac{{{a}^3}}{{3}} = {a**3 / 3:.4g}$$",
        " ".join(pool[3:5]),
    ]
    return "\n\n".join(parts)


def _plain_math(rng: random.Random) -> str:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    pool = rng.sample(_T["MATH_PROSE"], 5)
    return "\n".join(
        [
            f"Let f(x) = {a}x^2 + {b}x - {a + b}.",
            f"Then f'(x) = {2 * a}x + {b}.",
            f"Setting f'(x) = 0 gives x = -{b}/{2 * a}.",
            " ".join(pool[:3]),
            f"f(1) = {a} + {b} - {a + b} = 0, so x = 1 is a root.",
            " ".join(pool[3:5]),
        ]
    )


def _junk(rng: random.Random) -> list[tuple[str, str, str]]:
    """(kind, content type, text) of documents every filter set should remove."""
    mash = " ".join(
        "".join(rng.choice("qwertasdfgzxcvbyuiophjklnm") for _ in range(rng.randint(3, 9)))
        for _ in range(120)
    )
    js = "var a=" + ",".join(f"b{i}=function(c){{return c*{i}}}" for i in range(400)) + ";"
    blob = base64.b64encode(bytes(rng.randrange(256) for _ in range(3000))).decode()
    return [
        ("short", "prose", "Thanks, great post!"),
        ("short", "prose", "首页 | 登录"),
        ("short", "prose", "Weiter lesen"),
        ("short", "prose", "ok"),
        ("spam_lines", "prose", "\n".join(["Best deals of the year, order now!"] * 25)),
        ("keyword_stuffing", "prose", " ".join(["cheap shoes online buy cheap shoes best price"] * 40)),
        (
            "navigation",
            "prose",
            "Home\nAbout\nProducts\nBlog\nContact\nLogin\nRegister\nCart\nFAQ\nSitemap\n" * 3,
        ),
        ("lorem", "prose", "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 12),
        ("symbols", "prose", "#### $$$ %%% @@@ !!! *** ### &&& ^^^ ~~~ " * 20),
        ("mojibake", "prose", "Ã©tÃ© Ã  la plage, trÃ¨s \ufffd\ufffd\ufffd bien \ufffd\ufffd " * 30),
        ("keyboard_mash", "prose", mash),
        ("all_caps", "prose", "BUY NOW!!! LIMITED OFFER!!! CLICK HERE!!! FREE GIFT!!! " * 20),
        (
            "cookie_banner",
            "prose",
            "We use cookies to improve your experience. Accept all cookies. Manage preferences. "
            "Privacy policy. Terms of use.\nAccept\nReject\nSettings",
        ),
        ("link_list", "prose", "\n".join(f"http://example{i}.com/page?id={i}" for i in range(60))),
        ("spam_zh", "prose", "点击这里免费下载最新电影高清无广告 " * 40),
        ("spam_de", "prose", "Jetzt kaufen! Günstig bestellen! Versandkostenfrei! " * 30),
        ("minified_js", "code", js),
        (
            "autogenerated",
            "code",
            "// Code generated by protoc-gen-go. DO NOT EDIT.\n// source: user.proto\n\n"
            "package userpb\n\n" + "\n".join(f"const Field{i} = {i}" for i in range(40)),
        ),
        ("base64_blob", "code", f'ICON = "{blob}"\n'),
        (
            "numeric_dump",
            "code",
            "\n".join(",".join(str(rng.randint(0, 99999)) for _ in range(12)) for _ in range(80)),
        ),
    ]


def _valid_phone(rng: random.Random, region: str, fmt: str) -> str:
    import phonenumbers

    ex = phonenumbers.example_number_for_type(
        region,
        phonenumbers.PhoneNumberType.MOBILE
        if rng.random() < 0.5
        else phonenumbers.PhoneNumberType.FIXED_LINE,
    )
    nat = str(ex.national_number)
    for _ in range(200):  # vary the last digits, keep what libphonenumber calls a valid number
        cand = nat[:-4] + "".join(str(rng.randrange(10)) for _ in range(4))
        num = phonenumbers.parse(cand, region)
        if phonenumbers.is_valid_number(num):
            break
    style = {
        "intl": phonenumbers.PhoneNumberFormat.INTERNATIONAL,
        "nat": phonenumbers.PhoneNumberFormat.NATIONAL,
        "e164": phonenumbers.PhoneNumberFormat.E164,
    }[fmt]
    return phonenumbers.format_number(num, style)


PII_LINES = {
    "en": ("Contact {name} at {email} or call {phone}.", "The server at {ip} was rebooted."),
    "de": ("Schreiben Sie an {email} oder rufen Sie {phone} an.", "Der Server {ip} wurde neu gestartet."),
    "es": ("Escriba a {email} o llame al {phone}.", "El servidor {ip} se reinició anoche."),
    "fr": ("Écrivez à {email} ou appelez le {phone}.", "Le serveur {ip} a redémarré."),
    "ru": ("Пишите на {email} или звоните по номеру {phone}.", "Сервер {ip} был перезагружен."),
    "zh": ("请发邮件到 {email} 或拨打 {phone} 联系我们。", "服务器 {ip} 已经重新启动。"),
    "ja": ("{email} までメールするか、{phone} に電話してください。", "サーバー {ip} を再起動しました。"),
}
REGION = {"en": "US", "de": "DE", "es": "ES", "fr": "FR", "ru": "RU", "zh": "CN", "ja": "JP"}
TRAPS = [
    "The firmware 2.4.1.7 fixes the boot problem.",
    "Upgrade to version 10.2.0.1 before March.",
    "The meeting is on 2024-03-15 at 14:30.",
    "Order number 4839201 was shipped on 12.05.2023.",
    "The ISBN is 978-3-16-148410-0.",
    "Run the service on 127.0.0.1 port 8080.",
    "The population grew from 1,204,331 to 1,318,902 between 2010 and 2020.",
]


def make_records(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    recs: list[dict] = []

    def add(kind: str, content: str, lang: str, text: str, **extra) -> dict:
        rec = {
            "id": f"{kind}-{content}-{lang}-{len(recs)}",
            "text": text,
            "label": {"kind": kind, "content": content, "lang": lang, **extra},
        }
        recs.append(rec)
        return rec

    for lang in LANGS:
        for _ in range(22):
            add("clean", "prose", lang, _prose(lang, rng))
        for _ in range(4):
            add("clean", "prose", lang, _forum(lang, rng), genre="forum")
    for _ in range(30):
        add("clean", "code", "python", _python_file(rng))
    for _ in range(25):
        add("clean", "code", "javascript", _js_file(rng))
    add("clean", "code", "go", _T["GO_FILE"])
    add("clean", "code", "sql", _T["SQL_FILE"])
    for i in range(24):
        add("clean", "code", "en" if i % 3 else "de", _tutorial(rng, german=i % 3 == 0), genre="tutorial")
    for _ in range(15):
        add("clean", "math", "en", _latex(rng), genre="latex")
    for _ in range(20):
        add("clean", "math", "en", _web_math(rng), genre="inline_math")
    for _ in range(12):
        add("clean", "math", "en", _plain_math(rng), genre="plain_math")
    # clean documents with look-alikes that must not be masked
    for _ in range(25):
        text = _prose("en", rng) + "\n\n" + " ".join(rng.sample(TRAPS, 2))
        add("clean", "prose", "en", text, traps=True)
    # planted PII: one e-mail, one phone, one IP per document (IPv6 every third)
    for i in range(70):
        lang = LANGS[i % len(LANGS)]
        fmt = ["intl", "nat", "e164"][i % 3]
        phone = _valid_phone(rng, REGION[lang] if fmt != "intl" or i % 2 else "GB", fmt)
        user = rng.choice(["jane.doe", "m.mueller", "li.wei", "a.petrov", "info", "support+web"])
        email = f"{user}{i}@{rng.choice(['example.com', 'mail.example.org', 'posteo.de'])}"
        ip = (
            f"2001:db8:{rng.randrange(1, 9999):x}::{rng.randrange(1, 255):x}"
            if i % 3 == 0
            else ".".join(
                str(x) for x in (rng.choice([192, 10, 172, 203, 81]), rng.randrange(256), rng.randrange(256),
                                 rng.randrange(1, 255))
            )
        )
        contact, server = PII_LINES[lang]
        text = (
            _prose(lang, rng, 5)
            + "\n\n"
            + contact.format(name="Jane", email=email, phone=phone)
            + "\n\n"
            + server.format(ip=ip)
        )
        add(
            "clean",
            "prose",
            lang,
            text,
            pii=[
                {"type": "email", "value": email},
                {"type": "phone", "value": phone},
                {"type": "ip", "value": ip},
            ],
        )
    for i in range(6):  # secrets and an author e-mail in code: masked, the rest of the file byte-identical
        key = "AKIA" + "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16))
        email = f"dev{i}@example.com"
        code = f'# Author: Dev Team <{email}>\nAWS_ACCESS_KEY_ID = "{key}"\n\n' + _python_file(rng)
        add(
            "clean",
            "code",
            "python",
            code,
            pii=[{"type": "email", "value": email}, {"type": "secret", "value": key}],
        )
    for kind, content, text in _junk(rng):
        for j in range(3 if content == "prose" else 4):
            t = text if j == 0 else text.replace("  ", " ", j) + ("" if content == "code" else f" {j}")
            add("junk", content, "xx", t, junk=kind)
    clean = [r for r in recs if r["label"]["kind"] == "clean" and "pii" not in r["label"]]
    for r in rng.sample(clean, 12):
        add(
            "duplicate",
            r["label"]["content"],
            r["label"]["lang"],
            r["text"],
            duplicate_of=r["id"],
            near=False,
        )
    for r in rng.sample(clean, 12):
        words = r["text"].split(" ")
        if len(words) > 20:
            words[rng.randrange(len(words))] = "indeed"
        add(
            "duplicate",
            r["label"]["content"],
            r["label"]["lang"],
            " ".join(words),
            duplicate_of=r["id"],
            near=True,
        )
    rng.shuffle(recs)
    return recs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    recs = make_records(args.seed)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    print(f"wrote {len(recs)} records, {args.out.stat().st_size / 1e3:.0f} kB to {args.out}")


if __name__ == "__main__":
    main()

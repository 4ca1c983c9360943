"""Mask personal data and secrets in kept documents: e-mails, phone numbers, IP addresses, API keys.

- Phones: `phonenumbers` (Google's libphonenumber) finds numbers that are valid for their region:
  international ones (+49 ...) anywhere, national ones for the region of the document's language
  (de -> DE, zh -> CN ...) and the `regions` listed (US by default). Dates, ISBNs, version strings
  and long integers in code are not valid numbers, so they stay. Numbers of a possible length that
  no operator has assigned (the fictional 555-0100 ranges, "123-456-7890") are masked too when they
  are written like phone numbers: a leading "+", or grouped digits such as (555) 123-4567, or a
  phone word (tel, phone, call, Telefon, телефон, 电话 ...) right before them.
- IPv4 / IPv6: strings that parse as addresses (`ipaddress`), except (a) four-part version numbers
  ("firmware 2.4.1.7", "v1.2.3.4", "==1.2.0.1", "Section 3.1.2.4"): a version / section word or
  sign right before the number, and (b) addresses that identify nobody: loopback (127.0.0.1, ::1),
  unspecified (0.0.0.0), broadcast and netmasks (255.255.255.0).
- Secrets: the key formats that secret scanners (gitleaks, detect-secrets) match by prefix: AWS
  access keys, GitHub / GitLab / Slack / Stripe / Google / OpenAI / Hugging Face tokens, JWTs,
  PEM private-key blocks, and `password = "..."`-style assignments of long random strings.

Counts go to the document's `metadata.pii_masked` and to the step's `changes`.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from dataclasses import dataclass, field

from megaqwen.data_pipeline.document import Document
from megaqwen.data_pipeline.steps.base import Step

_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.]\d|\w)")
_IPV6 = re.compile(
    r"(?<![\w:\[])(?:[0-9A-Fa-f]{1,4}:){2,7}[0-9A-Fa-f]{1,4}(?![\w:])|"
    r"(?<![\w:\[])(?:[0-9A-Fa-f]{1,4}:){1,6}:(?:[0-9A-Fa-f]{1,4}:?){0,6}(?![\w:])"
)
# a version / numbering context right before a dotted quad: "version 2.4.1.7", "v1.2.3.4", "==1.0.0.1"
_VERSION_BEFORE = re.compile(
    r"(?:\b(?:v|ver|vers|version|versions|release|rel|build|firmware|fw|update|kernel|driver|sdk|api|"
    r"rev|revision|patch|edition|package|pkg|section|sect|chapter|ch|clause|article|art|rule|step|"
    r"table|figure|fig|item|paragraph|para|sec|§|версия|версии|版本|バージョン)\.?\s*[:=]?\s*|[=@~^<>vV]|"
    r"[\w)]-|\bv\.)$",
    re.IGNORECASE,
)
_VERSION_AFTER = re.compile(r"^(?:-(?:alpha|beta|rc|dev|post|snapshot)|\+\w)", re.IGNORECASE)
_PHONE_CANDIDATE = re.compile(r"\d[\d \t().\-/]{5,}\d")
_PHONE_GROUPED = re.compile(r"(?:\+?\d{1,3}[ .-])?\(?\d{2,4}\)?[ .-]\d{3,4}[ .-]\d{3,5}")
_DATE_LIKE = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4}")
_PHONE_WORD = re.compile(
    r"(?:tel|tél|phone|call|mobile|mob|cell|fax|hotline|whatsapp|telefon|teléfono|telefone|téléphone|"
    r"appelez|anrufen|ruf|llame|телефон|звоните|тел|电话|電話|手机|携帯)\W{0,12}$",
    re.IGNORECASE,
)
_SECRETS = [
    ("aws_key", re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}\b")),
    ("github_token", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})\b")),
    ("gitlab_token", re.compile(r"\bglpat-[A-Za-z0-9_-]{20,}\b")),
    ("slack_token", re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b")),
    ("stripe_key", re.compile(r"\b(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}\b")),
    ("google_api_key", re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b")),
    ("openai_key", re.compile(r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}\b")),
    ("hf_token", re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")),
    ("jwt", re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}")),
    ("private_key", re.compile(
        r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----[\s\S]+?-----END (?:[A-Z]+ )?PRIVATE KEY-----")),
]
# `api_key = "..."`, `"password": "..."`: the quoted value is masked when it looks random
_ASSIGNED_SECRET = re.compile(
    r"""(?i)\b(?:api[_-]?key|apikey|secret(?:[_-]?key)?|access[_-]?token|auth[_-]?token|token|password|passwd|"""
    r"""client[_-]?secret)["']?\s*[:=]\s*["']([^"'\s]{16,})["']"""
)
LANGUAGE_REGIONS = {
    "en": "GB", "de": "DE", "fr": "FR", "es": "ES", "it": "IT", "pt": "BR", "nl": "NL", "ru": "RU",
    "uk": "UA", "pl": "PL", "sv": "SE", "tr": "TR", "zh": "CN", "ja": "JP", "ko": "KR", "vi": "VN",
    "id": "ID", "ar": "SA", "hi": "IN",
}


def _entropy(s: str) -> float:
    counts = Counter(s)
    return -sum(c / len(s) * math.log2(c / len(s)) for c in counts.values())


def _is_identifying_ip(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if addr.is_loopback or addr.is_unspecified or str(addr) == "255.255.255.255":
        return False
    if addr.version == 4:  # netmasks: ones then zeros (255.255.255.0, 255.255.240.0)
        bits = int(addr)
        inv = ~bits & 0xFFFFFFFF
        if bits >> 24 == 0xFF and inv & (inv + 1) == 0:
            return False
    return True


@dataclass
class PiiConfig:
    email_replacement: str = "<EMAIL>"
    """text put where an e-mail address was."""
    ip_replacement: str = "<IP_ADDRESS>"
    """text put where an identifying IPv4/IPv6 address was."""
    phone_replacement: str = "<PHONE>"
    """text put where a phone number was."""
    secret_replacement: str = "<SECRET>"
    """text put where an API key, token, private key or assigned password was."""
    mask_emails: bool = True
    """mask e-mail addresses."""
    mask_ips: bool = True
    """mask IP addresses (valid addresses only; version numbers and loopback / netmasks stay)."""
    mask_phones: bool = True
    """mask phone numbers valid for their region (libphonenumber)."""
    mask_secrets: bool = True
    """mask API keys, tokens, private keys and assigned passwords."""
    regions: list[str] = field(default_factory=lambda: ["US"])
    """regions whose national-format numbers are searched in every document (plus the language's)."""


class PiiMasking(Step):
    name = "pii"
    Config = PiiConfig

    def _phones(self, text: str, lang: str | None) -> list[tuple[int, int]]:
        import phonenumbers

        if not _PHONE_CANDIDATE.search(text):
            return []
        extra = [LANGUAGE_REGIONS[lang]] if lang in LANGUAGE_REGIONS else []
        regions = list(dict.fromkeys(self.cfg.regions + extra))
        spans = []
        for region in regions:
            for m in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID):
                if self._plausible(text, m.start, m.raw_string, lang):
                    spans.append((m.start, m.end))
        # possible but unassigned numbers (fictional 555 ranges ...), only when written as phones
        for m in phonenumbers.PhoneNumberMatcher(text, regions[0], leniency=phonenumbers.Leniency.POSSIBLE):
            raw = m.raw_string
            if _DATE_LIKE.fullmatch(raw) or any(a <= m.start < b for a, b in spans):
                continue
            digits = sum(ch.isdigit() for ch in raw)
            if not self._plausible(text, m.start, raw, lang):
                continue
            if (raw.startswith("+") and digits >= 8) or _PHONE_GROUPED.fullmatch(raw) \
                    or _PHONE_WORD.search(text[max(0, m.start - 24) : m.start]):
                spans.append((m.start, m.end))
        return spans

    @staticmethod
    def _plausible(text: str, start: int, raw: str, lang: str | None) -> bool:
        """Not a decimal's tail, a table of small numbers or a bare integer in code or data."""
        if start >= 2 and text[start - 1] in ".," and text[start - 2].isdigit():
            return False  # 0.5772156649
        groups = re.findall(r"\d+", raw)
        if "  " in raw or sum(len(g) == 1 for g in groups) > 1:
            return False  # calendar rows, tables
        if len(groups) >= 3 and all(int(b) - int(a) == 1 for a, b in zip(groups, groups[1:])):
            return False  # 24 25 26 27 28: a run of consecutive numbers
        if raw.isdigit():  # no "+", no grouping: an id, a constant or a timestamp unless said to be a phone
            if lang in ("zh", "ja") and re.fullmatch(r"1[3-9]\d{9}", raw):
                return True  # a Chinese mobile number is written as 11 bare digits
            return bool(_PHONE_WORD.search(text[max(0, start - 24) : start]))
        return True

    def process(self, doc: Document) -> str | None:
        c = self.cfg
        counts: Counter = Counter()
        t = doc.text
        if c.mask_secrets:
            for _kind, rx in _SECRETS:
                t, n = rx.subn(c.secret_replacement, t)
                counts["secrets"] += n

            def assigned(m: re.Match) -> str:
                v = m.group(1)
                if v.startswith("<") or _entropy(v) < 3.0:  # a placeholder or a plain word
                    return m.group(0)
                counts["secrets"] += 1
                return m.group(0).replace(v, c.secret_replacement)

            t = _ASSIGNED_SECRET.sub(assigned, t)
        if c.mask_emails:
            t, n = _EMAIL.subn(c.email_replacement, t)
            counts["emails"] += n
        if c.mask_ips:

            def ip(m: re.Match) -> str:
                s = m.group(0)
                try:
                    addr = ipaddress.ip_address(s.rstrip(":"))
                except ValueError:
                    return s
                if addr.version == 4 and (
                    _VERSION_BEFORE.search(m.string[max(0, m.start() - 24) : m.start()])
                    or _VERSION_AFTER.match(m.string[m.end() : m.end() + 12])
                ):
                    return s
                if not _is_identifying_ip(addr):
                    return s
                # "1::2" is an address, but in text it is a slice or a ratio: ask for 4+ hex digits
                if addr.version == 6 and sum(ch not in ":." for ch in s) < 4:
                    return s
                counts["ips"] += 1
                return c.ip_replacement

            t = _IPV6.sub(ip, _IPV4.sub(ip, t))
        if c.mask_phones:
            spans = self._phones(t, doc.metadata.get("language"))
            if spans:
                merged: list[list[int]] = []
                for a, b in sorted(spans):
                    if merged and a < merged[-1][1]:
                        merged[-1][1] = max(merged[-1][1], b)
                    else:
                        merged.append([a, b])
                for a, b in reversed(merged):
                    t = t[:a] + c.phone_replacement + t[b:]
                counts["phones"] += len(merged)
        counts = +counts
        if counts:
            doc.metadata["pii_masked"] = dict(counts)
            self.stats.changes.update(counts)
            doc.text = t
        return None

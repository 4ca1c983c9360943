"""Mask personal data and secrets in kept documents: e-mails, phone numbers, IP addresses, API keys.

- Phones: `phonenumbers` (Google's libphonenumber) finds numbers that are valid for their region:
  international ones (+49 ...) anywhere, national ones for the region of the document's language
  (de -> DE, zh -> CN ...) and the `regions` listed (US by default). Dates, ISBNs, version strings
  and long integers in code are not valid numbers, so they stay.
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
    r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){2,7}[0-9A-Fa-f]{1,4}(?![\w:])|"
    r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){1,6}:(?:[0-9A-Fa-f]{1,4}:?){0,6}(?![\w:])"
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
                spans.append((m.start, m.end))
        return spans

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

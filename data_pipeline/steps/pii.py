"""Mask e-mail addresses and IP addresses (kept documents, rewritten text; counts in `metadata`)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from megaqwen.data_pipeline.document import Document
from megaqwen.data_pipeline.steps.base import Step

_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
_IPV6 = re.compile(
    r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){2,7}[0-9A-Fa-f]{1,4}(?![\w:])|"
    r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){1,6}:(?:[0-9A-Fa-f]{1,4}:?){0,6}(?![\w:])"
)


@dataclass
class PiiConfig:
    email_replacement: str = "<EMAIL>"
    """text put where an e-mail address was."""
    ip_replacement: str = "<IP_ADDRESS>"
    """text put where a valid IPv4/IPv6 address was."""
    mask_emails: bool = True
    """mask e-mail addresses."""
    mask_ips: bool = True
    """mask IP addresses (only strings that parse as valid addresses, so version numbers survive)."""


class PiiMasking(Step):
    name = "pii"
    Config = PiiConfig

    def process(self, doc: Document) -> str | None:
        counts = {"emails": 0, "ips": 0}

        def ip(m: re.Match) -> str:
            try:
                ipaddress.ip_address(m.group(0).rstrip(":"))
            except ValueError:
                return m.group(0)
            counts["ips"] += 1
            return self.cfg.ip_replacement

        def email(m: re.Match) -> str:
            counts["emails"] += 1
            return self.cfg.email_replacement

        t = doc.text
        if self.cfg.mask_emails:
            t = _EMAIL.sub(email, t)
        if self.cfg.mask_ips:
            t = _IPV6.sub(ip, _IPV4.sub(ip, t))
        if counts["emails"] or counts["ips"]:
            doc.metadata["pii_masked"] = counts
            doc.text = t
        return None

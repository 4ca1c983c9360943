"""PII: phones (libphonenumber), e-mails, IPs without version strings, secrets; look-alikes survive."""

from __future__ import annotations

import pytest

from megaqwen.data_pipeline.document import Document
from megaqwen.data_pipeline.steps.pii import PiiMasking


def mask(text: str, lang: str | None = None) -> str:
    doc = Document("d", text, {"language": lang} if lang else {})
    return PiiMasking()(doc).text


@pytest.mark.parametrize(
    "text,lang",
    [
        ("Call (415) 555-0132 today.", None),
        ("Call +1 415-555-0187 or 1-800-555-0199.", None),
        ("Ruf an: 030 901820 oder 0151 23456789.", "de"),
        ("Tel. +49 30 90182000", None),
        ("Appelez le 01 23 45 67 89.", "fr"),
        ("Звоните 8 (495) 123-45-67.", "ru"),
        ("电话：010-6552 9988 或 13800138000", "zh"),
        ("電話 03-1234-5678", "ja"),
        ("Phone: +44 20 7946 0958", None),
        ("Call 555-123-4567 or (555) 123-4567.", None),  # fictional ranges, written as phones
        ("Tel. 555-0199", None),
        ("Hotline +1 (555) 010-9999", None),
    ],
)
def test_phones_are_masked(text, lang):
    out = mask(text, lang)
    assert "<PHONE>" in out and not any(ch.isdigit() for ch in out.replace("<PHONE>", "")), out


@pytest.mark.parametrize(
    "text",
    [
        "The firmware 2.4.1.7 fixes the boot problem.",
        "Upgrade to version 10.2.0.1, or v1.2.3.4, or pin foo==1.0.0.1 and bar-2.3.4.5.",
        "See Section 3.1.2.4 and chapter 1.1.1.1 for details.",
        "The meeting is on 2024-03-15 at 14:30; order 4839201 shipped on 12.05.2023.",
        "ISBN 978-3-16-148410-0; population 1,204,331; x = 1000000007 % 998244353.",
        "Bind to 127.0.0.1 or 0.0.0.0 with netmask 255.255.255.0, and ::1 for IPv6.",
        "f(x) = 3x^2 + 2x - 5 and 3.14159265358979 are not phone numbers.",
        "assert u[1::2] == [1, 3] and sys.maxsize <= 2147483647 and gamma == 0.5772156649",
        " 3  4  5  6  7  8  9       7  8  9 10 11 12 13\n24 25 26 27 28 29 30      28 29",
    ],
)
def test_look_alikes_survive(text):
    assert mask(text) == text


def test_emails_ips_and_secrets():
    text = (
        "Mail jane.doe@example.com; the server 192.168.1.20. Also 81.2.69.160, 2001:db8::8a2e:370:7334 "
        'and fe80::1.\nAWS_ACCESS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"\ntoken = "ghp_' + "a1B2" * 9 + '"\n'
        'password = "hunter2"\napi_key = "9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c"'
    )
    doc = Document("d", text)
    out = PiiMasking()(doc)
    assert out.text == (
        "Mail <EMAIL>; the server <IP_ADDRESS>. Also <IP_ADDRESS>, <IP_ADDRESS> and <IP_ADDRESS>.\n"
        'AWS_ACCESS_KEY_ID = "<SECRET>"\ntoken = "<SECRET>"\npassword = "hunter2"\napi_key = "<SECRET>"'
    )  # a short plain password is not a random secret: it stays (documented)
    assert out.metadata["pii_masked"] == {"emails": 1, "ips": 4, "secrets": 3}

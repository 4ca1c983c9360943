"""Language profiles for the prose filters: stop words, word segmentation and per-language thresholds.

Gopher's and C4's rules were written for English: an English stop-word list, words split on
whitespace, 3-10 characters per word, sentences ending in ". ! ?". Applied unchanged they remove
every Chinese document (no spaces: one "word" per sentence) and most German, Russian or Spanish ones
(no English stop words). FineWeb-2 (Penedo et al. 2025) instead gives each language its own word
segmentation, stop words and thresholds; the profiles below follow that approach with our own short
lists of each language's most frequent function words.

Segmentation: space-delimited languages split on whitespace (punctuation stripped from word ends,
pure-punctuation tokens dropped); Han and kana characters are one word each (the stop-word lists of
zh / ja are single characters, so no dictionary is needed and counts do not depend on one).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# Han (CJK unified + ext. A + compatibility), hiragana, katakana
_CJK_CHARS = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK = re.compile(f"[{_CJK_CHARS}]")
_CJK_TOKENS = re.compile(f"[{_CJK_CHARS}]|[^\\s{_CJK_CHARS}]+")
_PUNCT_STRIP = "\"'()[]{}<>.,;:!?…“”‘’«»„*#、，。！？；：（）「」『』【】《》·"
# sentence ends: Latin/Cyrillic/Greek punctuation before a space, or CJK / Devanagari / Arabic marks
SENTENCE_END = re.compile(r"[.!?]+(?:[\"'”’)\]]*)(?:\s|$)|[。！？]+|[।؟]")
TERMINAL_PUNCT = (
    ".", "!", "?", '"', "'", "”", "’", "…", ":", ";", "。", "！", "？", "」", "』", "）", "।", "؟", "»",
)


def _words(s: str) -> frozenset[str]:
    return frozenset(s.split())


STOP_WORDS: dict[str, frozenset[str]] = {
    "en": _words("the be to of and that have with a in is it for on as was are this not you but by "
                 "from at or"),
    "de": _words("der die das und ist nicht zu den von mit sich des auf für im dem ein eine auch es an "
                 "als wie bei oder aus nach wird sind"),
    "es": _words("de la que el en y los del se las por un para con no una su al lo como más pero sus le "
                 "ya o fue este ha"),
    "fr": _words("de la le et les des en un une du est que pour qui dans pas sur au par plus ne se sont "
                 "avec il ce"),
    "it": _words("di e il la che in un per non una del della è sono si con da come al le gli ma anche"),
    "pt": _words("de a o que e do da em um para com não uma os no se na por mais as dos como mas ao"),
    "nl": _words("de het een en van in is dat op te zijn met voor niet die aan er ook als bij door maar"),
    "ru": _words("и в не на что я с он как это по но из к у за о же от так все был для то его она"),
    "uk": _words("і в не на що з та до це як у за про його але я від він вона ми"),
    "pl": _words("i w nie na się z że do to jest jak o ale po co tak za od przez dla jego są"),
    "sv": _words("och i att det som en på är av för med till den inte har de om ett var"),
    "tr": _words("ve bir bu da de için ile çok gibi daha olarak ama en değil ne o kadar sonra"),
    "id": _words("dan yang di ini itu untuk dengan tidak dari dalam akan pada juga ke ada bisa atau"),
    "vi": _words("và của là có không được cho với các những trong một người này đã để khi"),
    "ar": _words("في من على إلى أن عن مع هذا هذه التي الذي كان لا ما هو هي"),
    "hi": _words("के है में की और से को का एक पर यह हैं भी नहीं कि था"),
    "ko": _words("그리고 하지만 그러나 있다 있는 것이 수 등 및 더 또한 이 그 저 때문에 위해 대한 "
                 "같은 것은 한다"),
    "zh": frozenset("的是在了和有不这我他也就人都一上中为们到说要会与对而以及个"),
    "ja": frozenset("のにはをたがでてとしれさもなかるい"),
}


@dataclass(frozen=True)
class LanguageProfile:
    """How the prose filters count words and what they expect of one language."""

    stop_words: frozenset[str]
    """the language's most frequent function words (empty: the stop-word rule is skipped)."""
    cjk: bool = False
    """Han / kana characters are one word each (no spaces between words)."""
    min_avg_word_length: float = 3.0
    """mean word length (characters) below this: not prose (Gopher: 3 for English)."""
    max_avg_word_length: float = 10.0
    """mean word length above this: not prose (Gopher: 10 for English)."""
    short_line_chars: int = 30
    """FineWeb's "short line" length in characters (a CJK character carries ~3 Latin letters)."""


# Longer mean word lengths where compounds and inflection make words longer (de, nl, sv, ru, uk, pl,
# tr, fi); Vietnamese writes one syllable per word (shorter).
PROFILES: dict[str, LanguageProfile] = {
    "en": LanguageProfile(STOP_WORDS["en"]),
    "de": LanguageProfile(STOP_WORDS["de"], max_avg_word_length=13.0),
    "nl": LanguageProfile(STOP_WORDS["nl"], max_avg_word_length=12.0),
    "sv": LanguageProfile(STOP_WORDS["sv"], max_avg_word_length=12.0),
    "es": LanguageProfile(STOP_WORDS["es"], max_avg_word_length=11.0),
    "fr": LanguageProfile(STOP_WORDS["fr"], max_avg_word_length=11.0),
    "it": LanguageProfile(STOP_WORDS["it"], max_avg_word_length=11.0),
    "pt": LanguageProfile(STOP_WORDS["pt"], max_avg_word_length=11.0),
    "ru": LanguageProfile(STOP_WORDS["ru"], max_avg_word_length=13.0),
    "uk": LanguageProfile(STOP_WORDS["uk"], max_avg_word_length=13.0),
    "pl": LanguageProfile(STOP_WORDS["pl"], max_avg_word_length=13.0),
    "tr": LanguageProfile(STOP_WORDS["tr"], max_avg_word_length=14.0),
    "id": LanguageProfile(STOP_WORDS["id"], max_avg_word_length=12.0),
    "vi": LanguageProfile(STOP_WORDS["vi"], min_avg_word_length=1.5, max_avg_word_length=8.0),
    "ar": LanguageProfile(STOP_WORDS["ar"], min_avg_word_length=2.0, max_avg_word_length=12.0),
    "hi": LanguageProfile(STOP_WORDS["hi"], min_avg_word_length=1.5, max_avg_word_length=12.0),
    "ko": LanguageProfile(STOP_WORDS["ko"], min_avg_word_length=1.5, max_avg_word_length=8.0,
                          short_line_chars=12),
    "zh": LanguageProfile(STOP_WORDS["zh"], cjk=True, min_avg_word_length=0.0, max_avg_word_length=3.0,
                          short_line_chars=10),
    "ja": LanguageProfile(STOP_WORDS["ja"], cjk=True, min_avg_word_length=0.0, max_avg_word_length=4.0,
                          short_line_chars=10),
}
# an unlisted language: no stop-word rule, wide word-length bounds
UNKNOWN = LanguageProfile(frozenset(), min_avg_word_length=1.5, max_avg_word_length=15.0)


def profile_for(lang: str | None, text: str = "") -> LanguageProfile:
    """The language's profile; without a known language, CJK text (>= 30% Han/kana) is treated as such."""
    if lang in PROFILES:
        return PROFILES[lang]
    if lang is None or lang == "en":  # no language id ran: the English rules, as Gopher published them
        if text and is_mostly_cjk(text):
            return PROFILES["zh"]
        return PROFILES["en"]
    return UNKNOWN


def is_mostly_cjk(text: str, sample: int = 2000) -> bool:
    s = text[:sample]
    letters = sum(ch.isalpha() for ch in s)
    return letters > 0 and len(_CJK.findall(s)) / letters >= 0.3


def _is_punct(tok: str) -> bool:
    return all(unicodedata.category(ch)[0] == "P" for ch in tok)


def words(text: str, cjk: bool) -> list[str]:
    """Word tokens: whitespace split (or one per Han/kana character), end punctuation stripped."""
    raw = _CJK_TOKENS.findall(text) if cjk else text.split()
    out = []
    for w in raw:
        s = w.strip(_PUNCT_STRIP)
        if s:
            out.append(s)
        elif not _is_punct(w):
            out.append(w)  # a symbol run such as "%%%" or "==>" counts (it is what symbol rules measure)
    return out

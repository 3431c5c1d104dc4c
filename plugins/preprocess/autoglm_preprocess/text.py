"""Pure text functions: normalisation, content hashes and chunking by approximate tokens.

Token counts are approximations, on purpose (no tokenizer download, the same answer on every
machine):

* ``chars`` (default): one token is about **4 characters**, the usual rule of thumb for English
  with GPT-style BPE tokenizers. Chunks end at whitespace where possible. Text in Chinese,
  Japanese or Korean has about one token per 1-2 characters: lower ``chunk_tokens`` for it.
* ``whitespace``: one token is one run of non-space characters (a "word"); chunks keep the
  original spacing and newlines between the first and last word.

``overlap_tokens`` of the end of one chunk are repeated at the start of the next, so a sentence
cut in two is whole in one of them.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

CHARS_PER_TOKEN = 4

_NEWLINES = re.compile(r"\r\n|[\r\u2028\u2029\x85\x0b\x0c]")
_SPACES = re.compile(r"[^\S\n]+")
_BLANK_RUNS = re.compile(r"\n{3,}")
_WORD = re.compile(r"\S+")


def _clean_char(ch: str) -> str:
    cat = unicodedata.category(ch)
    if cat == "Cc":
        return ch if ch == "\n" else " "  # tabs and other controls become spaces
    if cat == "Cf" and ch not in "\u200c\u200d":  # keep ZWNJ/ZWJ (needed by some scripts)
        return ""  # zero-width space, BOM, bidi marks...
    return ch


def normalise(text: str) -> str:
    """NFKC; every newline form becomes ``\\n``; control characters become spaces and invisible
    format characters go; runs of spaces collapse to one; lines are trimmed; at most one empty
    line between paragraphs; no leading or trailing whitespace."""
    text = unicodedata.normalize("NFKC", text)
    text = _NEWLINES.sub("\n", text)
    if not text.isascii() or any(ord(c) < 32 and c != "\n" for c in text) or "\x7f" in text:
        text = "".join(_clean_char(c) for c in text)
    text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_RUNS.sub("\n\n", text).strip()


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def count_tokens(text: str, unit: str = "chars") -> int:
    if unit == "whitespace":
        return sum(1 for _ in _WORD.finditer(text))
    return -(-len(text) // CHARS_PER_TOKEN)


def chunk(text: str, size: int, overlap: int, unit: str = "chars") -> list[str]:
    """Split ``text`` into pieces of at most ``size`` approximate tokens, consecutive pieces
    sharing about ``overlap`` tokens. ``0 <= overlap < size``."""
    if size < 1 or not 0 <= overlap < size:
        raise ValueError("chunk size must be >= 1 and 0 <= overlap < size")
    if unit == "whitespace":
        return _chunk_words(text, size, overlap)
    return _chunk_chars(text, size * CHARS_PER_TOKEN, overlap * CHARS_PER_TOKEN)


def _chunk_words(text: str, size: int, overlap: int) -> list[str]:
    words = [(m.start(), m.end()) for m in _WORD.finditer(text)]
    if len(words) <= size:
        return [text] if words else []
    out = []
    step = size - overlap
    for first in range(0, len(words), step):
        last = min(first + size, len(words)) - 1
        out.append(text[words[first][0]:words[last][1]])
        if last == len(words) - 1:
            break
    return out


def _last_space(text: str, lo: int, hi: int) -> int:
    return max(text.rfind(" ", lo, hi), text.rfind("\n", lo, hi))


def _first_space(text: str, lo: int, hi: int) -> int:
    found = [i for i in (text.find(" ", lo, hi), text.find("\n", lo, hi)) if i >= 0]
    return min(found) if found else -1


def _chunk_chars(text: str, size: int, overlap: int) -> list[str]:
    if len(text) <= size:
        return [text] if text else []
    out = []
    start = 0
    while start < len(text):
        end = start + size
        if end >= len(text):
            piece = text[start:].strip()
            if piece:
                out.append(piece)
            break
        cut = _last_space(text, start + size // 2, end)  # end at a word boundary if we can
        if cut > start:
            end = cut
        piece = text[start:end].strip()
        if piece:
            out.append(piece)
        nxt = end
        if overlap and end - overlap > start:  # begin the overlap at a word boundary too
            cand = end - overlap
            space = _first_space(text, cand, end)
            nxt = space + 1 if space >= 0 else cand
        start = nxt
        while start < len(text) and text[start] in " \n":
            start += 1
    return out

"""Repair the broken characters found in published transcripts (MELD above all).

Three kinds of damage, all from Windows-1252 meeting UTF-8 somewhere upstream:
- raw cp1252 bytes in a UTF-8 file (b"\\x92" for ’), which do not decode at all;
- C1 control characters (U+0080–U+009F) where a cp1252 byte was read as Latin-1 ("\\x92" for ’);
- mojibake, UTF-8 read as cp1252 ("â€™" for ’).
"""

from __future__ import annotations

import re

_C1 = re.compile("[\u0080-\u009f]")
_MOJIBAKE = re.compile("[\u00c2\u00c3\u00e2][\u0080-\u00bf\u0152-\u02dc\u2013-\u2122]+")


def _cp1252(byte: int) -> str:
    try:
        return bytes([byte]).decode("cp1252")
    except UnicodeDecodeError:  # 0x81, 0x8d, 0x8f, 0x90, 0x9d are unassigned in cp1252
        return ""


def decode(raw: bytes) -> str:
    """UTF-8, with any byte that is not valid UTF-8 read as cp1252."""
    text = raw.decode("utf-8", errors="surrogateescape")
    return re.sub("[\udc80-\udcff]", lambda m: _cp1252(ord(m.group()) - 0xDC00), text)


def _undo_mojibake(match: re.Match) -> str:
    chunk = match.group()
    try:
        return chunk.encode("cp1252").decode("utf-8")
    except UnicodeError:
        return chunk


def repair(text: str) -> str:
    text = _MOJIBAKE.sub(_undo_mojibake, text)
    return _C1.sub(lambda m: _cp1252(ord(m.group())), text)

"""Repair the broken characters found in published transcripts (MELD above all).

Three kinds of damage, all from Windows-1252 meeting UTF-8 somewhere upstream:
- raw cp1252 bytes in a UTF-8 file (b"\\x92" for ’), which do not decode at all;
- C1 control characters (U+0080–U+009F) where a cp1252 byte was read as Latin-1 ("\\x92" for ’);
- mojibake, UTF-8 read as cp1252 ("â€™" for ’).
"""

from __future__ import annotations

import re

_C1 = re.compile("[\u0080-\u009f]")
# A UTF-8 lead byte read as cp1252, then exactly as many continuation bytes as it announces.
_CONT = "[\u0080-\u00bf\u0152-\u02dc\u2013-\u2122]"
_MOJIBAKE = re.compile(f"[\u00c2-\u00df]{_CONT}|[\u00e0-\u00ef]{_CONT}{{2}}|[\u00f0-\u00f4]{_CONT}{{3}}")


def _cp1252(byte: int) -> str:
    try:
        return bytes([byte]).decode("cp1252")
    except UnicodeDecodeError:  # 0x81, 0x8d, 0x8f, 0x90, 0x9d are unassigned in cp1252
        return ""


# Byte-order marks of text that is not UTF-8 at all (UTF-8's own is read), UTF-32 first: its LE mark starts as UTF-16's.
_WIDE_BOMS = {b"\xff\xfe\x00\x00": "UTF-32 (little-endian)", b"\x00\x00\xfe\xff": "UTF-32 (big-endian)",
              b"\xff\xfe": "UTF-16 (little-endian)", b"\xfe\xff": "UTF-16 (big-endian)"}


def wide_encoding(raw: bytes) -> str | None:
    """The encoding of UTF-16 or UTF-32 text (which `decode` would turn into garbage), else None: by its byte-order
    mark, or by NUL bytes, which UTF-8 text never holds."""
    for bom, name in _WIDE_BOMS.items():
        if raw.startswith(bom):
            return name
    if b"\x00" in raw[:65536]:
        return "UTF-16 or UTF-32 without a byte-order mark, or not text: it holds NUL bytes"
    return None


def decode(raw: bytes) -> str:
    """UTF-8, with any byte that is not valid UTF-8 read as cp1252."""
    text = raw.decode("utf-8", errors="surrogateescape")
    return re.sub("[\udc80-\udcff]", lambda m: _cp1252(ord(m.group()) - 0xDC00), text)


def _as_byte(ch: str) -> bytes:
    """The byte a cp1252 reader turned into `ch` (C1 characters: bytes cp1252 leaves unassigned)."""
    return bytes([ord(ch)]) if ord(ch) < 0x100 else ch.encode("cp1252")


def _undo_mojibake(match: re.Match) -> str:
    chunk = match.group()
    try:
        return b"".join(map(_as_byte, chunk)).decode("utf-8")
    except UnicodeError:
        return chunk


def repair(text: str) -> str:
    text = _MOJIBAKE.sub(_undo_mojibake, text)
    return _C1.sub(lambda m: _cp1252(ord(m.group())), text)

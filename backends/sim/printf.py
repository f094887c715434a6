"""The bpf_snprintf format grammar, once: the verifier's format check and the runtime's formatting both parse
with `parse`, so a format the verifier admits is exactly one the runtime can render.

The outline of bpf_bprintf_prepare: printable text, `%%`, and conversions `%[-+ 0#]*[0-9]*(ll|l|h)?[diuxXcsp]`,
each taking one 8-byte argument, at most MAX_BPRINTF_VARARGS of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

MAX_BPRINTF_VARARGS = 12
_FLAGS = b"-+ 0#"
_CONVERSIONS = b"diuxXcsp"


@dataclass(frozen=True, slots=True)
class Conversion:
    flags: str
    width: str
    length: str  # "", "h", "l" or "ll"
    conv: str  # one of diuxXcsp


Token = str | Conversion  # literal text (latin-1) or a conversion


def parse(fmt: bytes) -> list[Token] | None:
    """The format's text and conversions in order; None for one bpf_bprintf_prepare refuses."""
    out: list[Token] = []
    text = bytearray()
    i, n = 0, len(fmt)
    while i < n:
        c = fmt[i]
        if c != ord("%"):
            if not (0x20 <= c < 0x7F or c in b"\t\n\r"):
                return None
            text.append(c)
            i += 1
            continue
        if fmt[i + 1:i + 2] == b"%":
            text.append(c)
            i += 2
            continue
        i += 1
        start = i
        while i < n and fmt[i] in _FLAGS:
            i += 1
        flags = fmt[start:i]
        start = i
        while i < n and fmt[i:i + 1].isdigit():
            i += 1
        width = fmt[start:i]
        length = b"ll" if fmt[i:i + 2] == b"ll" else fmt[i:i + 1] if fmt[i:i + 1] in (b"l", b"h") else b""
        i += len(length)
        if i >= n or fmt[i] not in _CONVERSIONS:
            return None
        if text:
            out.append(text.decode("latin-1"))
            text.clear()
        out.append(Conversion(flags.decode(), width.decode(), length.decode(), chr(fmt[i])))
        i += 1
    if text:
        out.append(text.decode("latin-1"))
    return out


def check(fmt: bytes, nargs: int) -> bool:
    """Whether bpf_snprintf accepts `fmt` with `nargs` arguments: each conversion takes one, none left over."""
    tokens = parse(fmt)
    if tokens is None:
        return False
    used = sum(isinstance(t, Conversion) for t in tokens)
    return used == nargs and used <= MAX_BPRINTF_VARARGS


def render(fmt: bytes, args: Sequence[int], string_at: Callable[[int], bytes]) -> str:
    """bpf_snprintf's output for an admitted format; `string_at` reads a `%s` argument's string."""
    tokens = parse(fmt)
    if tokens is None:
        raise ValueError(f"format {fmt!r} is not one bpf_snprintf accepts")
    out: list[str] = []
    argi = 0
    for token in tokens:
        if isinstance(token, str):
            out.append(token)
            continue
        raw = args[argi] if argi < len(args) else 0
        argi += 1
        out.append(_convert(token, raw, string_at))
    return "".join(out)


def _convert(c: Conversion, raw: int, string_at: Callable[[int], bytes]) -> str:
    # C's flags in Python's spec: '-' justifies left (Python's '-' is a sign option, not an alignment), '0'
    # pads only a right-justified number, '+' and ' ' sign only the signed conversions, '#' prefixes hex
    align = "<" if "-" in c.flags else ""
    if c.conv == "s":
        text = string_at(raw).decode("latin-1")
    elif c.conv == "c":
        text = chr(raw & 0xFF)
    elif c.conv == "p":
        text = f"{raw:#x}"
    else:
        bits = 64 if c.length in ("l", "ll") else 32
        value = raw & ((1 << bits) - 1)
        sign = ""
        if c.conv in "di":
            value = value - (1 << bits) if value >> (bits - 1) else value
            sign = "+" if "+" in c.flags else " " if " " in c.flags else ""
        alt = "#" if "#" in c.flags and c.conv in "xX" else ""
        zero = "0" if "0" in c.flags and not align else ""
        return format(value, f"{align}{sign}{alt}{zero}{c.width}{'d' if c.conv in 'iu' else c.conv}")
    return format(text, f"{align}{c.width}s")

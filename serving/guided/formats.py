"""JSON Schema `format` on strings, enforced as a pattern (patterns.py) from a table: the formats tool schemas use.

Each pattern writes a subset of what its format allows (ASCII, no JSON escapes), so the output is valid wherever a
validator checks the format:
- date: YYYY-MM-DD (RFC 3339 full-date), year 0001-9999 (not 0000, which Python's datetime and pydantic refuse),
  month 01-12 and the day within the month (29 February in leap years only).
- time: HH:MM:SS, an optional fraction of 1-9 digits, then Z or +HH:MM / -HH:MM (RFC 3339 full-time: the offset is
  required there; no leap second 60, which Python's datetime refuses; upper-case Z only).
- date-time: date "T" time (RFC 3339; upper-case T).
- uuid: 8-4-4-4-12 hex digits (either case).
- email: a practical subset: a local part of one atom or two joined by a dot (atoms of letters, digits and
  ! # $ % & ' * + / = ? ^ _ ` { | } ~ -; at most 32 + 1 + 31 characters), "@", 1-3 labels (letters, digits, inner
  hyphens, at most 47 characters each) each followed by a dot, then a top-level label of 2-24 letters: at most 233
  characters in all (254 allowed).
- ipv4: four decimal octets 0-255 without leading zeros.
- ipv6: the eight hex groups in full or with one "::" (RFC 4291 text forms without an embedded IPv4 tail).
- hostname: 1-4 dot-separated labels (RFC 1123: letters, digits, inner hyphens, at most 62 characters each here,
  so 251 in all within the 253 allowed).
- uri: a practical subset of RFC 3986: scheme ":" then "//" host [":" port 0-65535] with a path, or a path without the
  "//", then an optional "?" query and "#" fragment; characters from RFC 3986's sets or %XX (no spaces, no
  brackets).
Other formats (int32, regex, ...) are annotations, ignored as JSON Schema allows.
"""

from __future__ import annotations

__all__ = ["FORMATS", "format_pattern"]


def _date() -> str:
    days = r"(0[1-9]|1[0-9]|2[0-8])"
    month_day = rf"((0[1-9]|1[0-2])-{days}|(0[13-9]|1[0-2])-(29|30)|(0[13578]|1[02])-31)"
    leap = r"([0-9]{2}(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)"  # never 0000
    year = r"(000[1-9]|00[1-9][0-9]|0[1-9][0-9]{2}|[1-9][0-9]{3})"  # 0001-9999: datetime and pydantic refuse 0000
    return rf"({year}-{month_day}|{leap}-02-29)"


_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,9})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
_MAIL_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,45}[A-Za-z0-9])?"
_HOST_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,60}[A-Za-z0-9])?"
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_H16 = r"[0-9A-Fa-f]{1,4}"
_IPV6 = "|".join([rf"({_H16}:){{7}}{_H16}", rf"({_H16}:){{1,7}}:", rf"({_H16}:){{1,6}}:{_H16}",
                  rf"({_H16}:){{1,5}}(:{_H16}){{1,2}}", rf"({_H16}:){{1,4}}(:{_H16}){{1,3}}",
                  rf"({_H16}:){{1,3}}(:{_H16}){{1,4}}", rf"({_H16}:){{1,2}}(:{_H16}){{1,5}}",
                  rf"{_H16}:(:{_H16}){{1,6}}", rf":((:{_H16}){{1,7}}|:)"])  # fmt: skip
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_PCT = r"%[0-9A-Fa-f]{2}"
_SUB = r"A-Za-z0-9\-._~!$&'()*+,;="  # RFC 3986 unreserved and sub-delims
_PCHAR = rf"([{_SUB}:@]|{_PCT})"
_QUERY = rf"([{_SUB}:@/?]|{_PCT})*"
_PORT = r"(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}|0)"  # 0-65535

FORMATS = {
    "date": _date(),
    "time": _TIME,
    "date-time": rf"{_date()}T{_TIME}",
    "uuid": r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}",
    "email": rf"{_ATOM}{{1,32}}(\.{_ATOM}{{1,31}})?@({_MAIL_LABEL}\.){{1,3}}[A-Za-z]{{2,24}}",
    "ipv4": rf"{_OCTET}(\.{_OCTET}){{3}}",
    "ipv6": _IPV6,
    "hostname": rf"{_HOST_LABEL}(\.{_HOST_LABEL}){{0,3}}",
    "uri": rf"[A-Za-z][A-Za-z0-9+.\-]*:(//([{_SUB}]|{_PCT})*(:{_PORT})?(/{_PCHAR}*)*|{_PCHAR}+(/{_PCHAR}*)*)?"
    rf"(\?{_QUERY})?(#{_QUERY})?",
}


def format_pattern(name) -> str | None:
    """The pattern that enforces format `name`; None for a format this table does not have (an annotation)."""
    return FORMATS.get(name) if isinstance(name, str) else None

"""Text that reaches a terminal: no control or bidirectional-override characters.

Experiment names, ids from a spreadsheet, file paths and model output are user- or
model-supplied; printed raw, an escape sequence in one of them could rewrite the screen,
hide a line or change the terminal's title. Everything asyncrunner prints to a console goes
through `for_terminal`, which keeps tabs and newlines and shows anything else as a visible
escape (`\\x1b`), so the text stays readable and nothing is silently dropped.
"""

from __future__ import annotations

import re

# C0 controls but tab and newline, DEL, C1 controls, and the Unicode line separators and
# bidirectional overrides/isolates ("Trojan source").
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def for_terminal(text: str) -> str:
    return _UNSAFE.sub(_escape, text)

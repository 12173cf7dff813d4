"""Scrubbing of personal data from texts: e-mail addresses, phone numbers, dates and record numbers
become `[EMAIL]`, `[PHONE]`, `[DATE]`, `[ID]` (and user patterns `[NAME]`), counted per kind.

All detectors are alternatives of one compiled regex, so a text is scanned once however many kinds
are on. The patterns are deliberately narrow: reports are full of numbers that are not personal
(`3.5 cm`, `T2`, `C5-C6`, `120/80`, `12 x 8 mm`, `1.5T`), and scrubbing a measurement destroys the
very content a model should learn. A date needs three parts or a month name; a phone number needs
ten digits in groups or a leading `+`; a bare number needs seven digits to count as a record number.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Mapping, Sequence

_MONTH = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|"
          r"Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)\.?")
_DAY = r"(?:[12]\d|3[01]|0?[1-9])"

# kind -> pattern. `id` keeps a label such as "MRN:" in front of the token (group `label`).
BUILTIN: dict[str, str] = {
    "email": r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b",
    "date": (
        r"\b(?:\d{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])"            # 2021-03-04
        rf"|{_DAY}[/-]{_DAY}[/-](?:\d{{4}}|\d{{2}})"                          # 03/04/2021, 3-4-21
        rf"|{_DAY}\.{_DAY}\.\d{{4}}"                                            # 04.03.2021 (not 1.2.3)
        rf"|(?i:{_MONTH})\s+{_DAY}(?:st|nd|rd|th)?,?\s+\d{{4}}"                # March 4, 2021
        rf"|{_DAY}(?:st|nd|rd|th)?\s+(?i:{_MONTH})\s+\d{{4}})\b"               # 4 March 2021
    ),
    "phone": (
        r"(?<![\w.])(?:\+\d{1,3}[\s.-]?\(?\d{1,4}\)?(?:[\s.-]?\d{2,4}){2,3}"      # +44 20 7946 0958
        r"|(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4})(?![\w.]\d)"              # (555) 123-4567, 555.123.4567
    ),
    "id": (
        r"(?P<label>\b(?i:MRN|MR\s?#|medical\s+record(?:\s+(?:no\.?|number|#))?|patient\s+id|"
        r"accession(?:\s+(?:no\.?|number|#))?|acc\.?\s?#|SSN|ID)\s*(?:[:#]|no\.?|number)?\s*)"
        r"[A-Za-z]{0,4}-?\d[\d-]{3,}\b"                                                 # MRN: 1234567, ID: AB-12345
        r"|\b\d{3}-\d{2}-\d{4}\b"                                                       # 123-45-6789
        r"|\b\d{7,}\b"                                                                   # long digit runs
    ),
}


class PIIScrubber:
    """Replaces personal data in texts and counts the replacements per kind.

    Args:
        kinds: built-in kinds to detect (`email`, `phone`, `date`, `id`).
        patterns: extra detectors, name -> regex, tried before the built-in ones; a match becomes
            `[NAME]`.

    Attributes:
        counts: replacements made so far, per kind.
    """

    def __init__(self, kinds: Sequence[str] = tuple(BUILTIN), patterns: Mapping[str, str] | None = None) -> None:
        self._kinds: list[str] = []
        alternatives = []
        # user patterns first: at the same position the earlier alternative wins
        for name, pattern in list((patterns or {}).items()) + [(k, BUILTIN[k]) for k in BUILTIN if k in kinds]:
            group = f"k{len(self._kinds)}"
            alternatives.append(f"(?P<{group}>{_renumber(pattern, group)})")
            self._kinds.append(name)
        self._regex = re.compile("|".join(alternatives)) if alternatives else None
        self._groups = [f"k{i}" for i in range(len(self._kinds))]
        self.counts: Counter = Counter({k: 0 for k in self._kinds})

    def _replace(self, match: re.Match) -> str:
        for group, kind in zip(self._groups, self._kinds):
            if match.group(group) is not None:
                self.counts[kind] += 1
                label = match.groupdict().get(f"{group}_label")
                return f"{label or ''}[{kind.upper()}]"
        return match.group(0)  # unreachable: one alternative always matched

    def __call__(self, text: str) -> str:
        """`text` with every detected item replaced by its token."""
        if self._regex is None:
            return text
        return self._regex.sub(self._replace, text)


def _renumber(pattern: str, group: str) -> str:
    """Makes a pattern's named groups unique inside the combined regex (`label` -> `k3_label`)."""
    pattern = re.sub(r"\(\?P<(\w+)>", lambda m: f"(?P<{group}_{m.group(1)}>", pattern)
    return re.sub(r"\(\?P=(\w+)\)", lambda m: f"(?P={group}_{m.group(1)})", pattern)

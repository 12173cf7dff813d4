"""Built-in verifiable rewards: the final answer, the format, the length.

Every reward function takes keyword arguments and returns one float per completion:
`prompts` (the rendered prompts), `completions` (the generated texts), `completion_lengths` (tokens
each), and every metadata column of the prompt rows (e.g. `answer`), as TRL's reward functions do,
so functions written for TRL's `GRPOTrainer` work here unchanged. Extra settings come from the
reward's `kwargs` in the config.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

from mmtune.errors import ConfigError, DataError
from mmtune.registry import Registry

BUILTIN_REWARDS: Registry = Registry("reward function")

GSM8K_ANSWER = r"####\s*(.+?)\s*$"


def _normalized(text: str) -> str:
    """`$1,234.50` and `1234.5` compare equal; other text compares stripped and case-folded."""
    value = text.strip().strip(".").replace(",", "").replace("$", "").strip()
    try:
        number = float(value)
    except ValueError:
        return value.casefold()
    return repr(int(number)) if number == int(number) else repr(number)


def final_answer(text: str, pattern: str = GSM8K_ANSWER) -> Optional[str]:
    """The last match of `pattern`'s first group in `text` (GSM8K's `#### 72` by default), None if absent."""
    found = re.findall(pattern, text, flags=re.MULTILINE)
    if not found:
        return None
    last = found[-1]
    return last if isinstance(last, str) else last[0]


@BUILTIN_REWARDS.register("exact_match")
def exact_match(completions: Sequence[str], column: str = "answer", pattern: str = GSM8K_ANSWER,
                answer_pattern: Optional[str] = None, **columns) -> list[float]:
    """1.0 where the completion's final answer (found by `pattern`) equals the row's `column`, else 0.0.

    The reference may be a bare answer (`72`) or a worked solution that ends in `#### 72` (GSM8K's
    `answer` column): `answer_pattern` (default: `pattern`) extracts it, falling back to the whole value.
    Numbers compare by value (`1,000` = `1000.0`).
    """
    if column not in columns:
        raise DataError(f"reward exact_match reads the column {column!r}, which the prompt rows do not have "
                        f"(columns: {sorted(k for k in columns if k not in ('prompts', 'completion_lengths'))})")
    out = []
    for completion, reference in zip(completions, columns[column]):
        reference = str(reference)
        want = final_answer(reference, answer_pattern or pattern) or reference
        got = final_answer(completion, pattern)
        out.append(1.0 if got is not None and _normalized(got) == _normalized(want) else 0.0)
    return out


@BUILTIN_REWARDS.register("regex_format")
def regex_format(completions: Sequence[str], pattern: str = "", mode: str = "search", **_) -> list[float]:
    """1.0 where the completion matches `pattern` (`mode`: `search` anywhere, `fullmatch` the whole text,
    stripped), else 0.0; e.g. `<think>.*?</think>\\s*<answer>.*?</answer>` with `fullmatch`."""
    if not pattern:
        raise ConfigError("reward regex_format needs kwargs.pattern (a regular expression)")
    if mode not in ("search", "fullmatch"):
        raise ConfigError(f"reward regex_format: mode must be 'search' or 'fullmatch', got {mode!r}")
    regex = re.compile(pattern, flags=re.DOTALL)
    match = regex.search if mode == "search" else regex.fullmatch
    return [1.0 if match(c.strip() if mode == "fullmatch" else c) else 0.0 for c in completions]


@BUILTIN_REWARDS.register("length_penalty")
def length_penalty(completions: Sequence[str], completion_lengths: Sequence[int], target: int = 64, **_) -> list[float]:
    """0 up to `target` tokens, then minus the share by which a completion overshoots it
    (`-(n - target) / target`): with a small weight it discourages rambling without rewarding silence."""
    if target < 1:
        raise ConfigError(f"reward length_penalty: target must be at least 1 token, got {target}")
    return [-max(0, int(n) - target) / target for n in completion_lengths]

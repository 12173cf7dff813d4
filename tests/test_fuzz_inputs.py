"""Hostile and broken input, measured: a seeded generator of broken files for every data reader
(manifests, JSONL/CSV with bad quoting, wrong encodings, UTF-16 and BOMs, truncated, zero-byte and
odd-sized images, decompression bombs, symlink loops, huge texts, duplicated ids, wrong types in
every field). Each must give a named error or a counted skip (rows in = rows used + rows skipped),
or be read whole when it is valid; never an uncaught traceback, a lost row or a hang. See
`tests/support/fuzz_cases.py` for the judge and `tools/fuzz_inputs.py` for the counts."""

from __future__ import annotations

import logging

import pytest

from tests.support.fuzz_cases import DEFECT, NAMED, READ, SKIP, judge
from tests.support.fuzz_readers import SCHEMAS, all_cases

CASES = all_cases()


def test_the_generator_is_seeded_and_covers_every_reader():
    assert len(CASES) >= 200
    assert [c.id for c in all_cases()] == [c.id for c in CASES]
    assert len({c.id for c in CASES}) == len(CASES)  # a failure names one case
    readers = {c.reader for c in CASES}
    assert {s.reader for s in SCHEMAS} | {"classification folder"} <= readers


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_broken_input_is_a_named_error_or_a_counted_skip(case, tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    outcome = judge(case, tmp_path)
    assert outcome.kind != DEFECT, f"{case.id}: {outcome.detail}"
    assert outcome.kind in (NAMED, SKIP, READ)

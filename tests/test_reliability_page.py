"""docs/reliability.md shows the figures of the committed run, reports/reliability.json: its
tables are rendered from that file, so the page cannot drift from what the tests measured."""

from __future__ import annotations

import json

from tests.report import BLOCK, COMMITTED, PAGE, render_page


def test_the_page_shows_the_committed_figures():
    page, data = PAGE.read_text(), json.loads(COMMITTED.read_text())
    assert render_page(page, data) == page, ("docs/reliability.md differs from "
                                             "reports/reliability.json: run python -m tests.report")
    shown = {m.group(2) for m in BLOCK.finditer(page)}
    assert shown == set(data), (sorted(set(data) - shown), sorted(shown - set(data)))

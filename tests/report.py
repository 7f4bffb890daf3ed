"""The reliability figures that tests measure, merged into one JSON file, and the tables of
docs/reliability.md rendered from it.

A test run writes them under its temporary folder; the committed figures come from an explicit
run: `MMDEMO_REPORT=reports/reliability.json python -m pytest -m slow tests/...`, then
`python -m tests.report` rewrites the tables of docs/reliability.md from that file (between
its `<!-- figures:SECTION -->` markers; a test checks that they match). Each test writes its
own section; a section is replaced whole, so a rerun of one test updates its figures and
leaves the others as they were.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


COMMITTED = ROOT / "reports" / "reliability.json"
PAGE = ROOT / "docs" / "reliability.md"


def report_path() -> Path:
    """$MMDEMO_REPORT, else a file in the temporary folder (pytest's, in a test run): a test
    run never rewrites the committed figures."""
    default = Path(tempfile.gettempdir()) / "mmdemo-reliability.json"
    return Path(os.environ.get("MMDEMO_REPORT") or default)


def record(section: str, figures: dict) -> None:
    """Write `figures` under `section`, with the time and machine it was measured on."""
    path = report_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = json.loads(path.read_text()) if path.is_file() else {}
        except ValueError:
            data = {}
        data[section] = {**figures, "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                         "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dict(sorted(data.items())), indent=2) + "\n")
        os.replace(tmp, path)


# ----------------------------------------------------------------------------- the page


def _cell(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, dict)):
        v = json.dumps(v, ensure_ascii=False)
    return str(v).replace("|", "\\|").replace("\n", " ")


def render(section: str, figures: dict) -> str:
    """A section's figures as Markdown: a table of its scalars, and one of its `cases`."""
    scalars = {k: v for k, v in figures.items() if k not in ("cases", "measured", "machine")
               and not isinstance(v, (list, dict))}
    out = [f"_Measured {figures.get('measured', '?')} on {figures.get('machine', '?')}._", ""]
    if scalars:
        out += ["| figure | value |", "|---|---|"]
        out += [f"| {k.replace('_', ' ')} | {_cell(v)} |" for k, v in scalars.items()]
        out.append("")
    for key, value in figures.items():
        if isinstance(value, dict) and key not in ("cases",):
            out += [f"**{key.replace('_', ' ')}:** " + ", ".join(
                f"{k} {_cell(v)}" for k, v in value.items()), ""]
    cases = figures.get("cases")
    if cases and isinstance(cases, list) and isinstance(cases[0], dict):
        cols = list(dict.fromkeys(k for c in cases for k in c))
        out += ["| " + " | ".join(c.replace("_", " ") for c in cols) + " |",
                "|" + "---|" * len(cols)]
        out += ["| " + " | ".join(_cell(c.get(k, "")) for k in cols) + " |" for c in cases]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


BLOCK = re.compile(r"(<!-- figures:(\w+) -->\n)(.*?)(<!-- /figures -->)", re.S)


def render_page(page: str, data: dict) -> str:
    """The page with every figures block rendered again from `data`."""
    def fill(m: re.Match) -> str:
        name = m.group(2)
        if name not in data:
            raise KeyError(f"docs/reliability.md asks for section {name!r}, which "
                           f"{COMMITTED.name} does not have")
        return m.group(1) + render(name, data[name]) + m.group(4)

    return BLOCK.sub(fill, page)


def main(argv: list[str] | None = None) -> int:
    """Rewrite docs/reliability.md's tables from reports/reliability.json."""
    data = json.loads(COMMITTED.read_text())
    PAGE.write_text(render_page(PAGE.read_text(), data))
    print(f"{PAGE.relative_to(ROOT)}: tables rendered from {COMMITTED.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

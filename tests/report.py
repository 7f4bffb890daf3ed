"""The reliability figures that tests measure, merged into one JSON file (reports/reliability.json
by default, MMDEMO_REPORT=PATH elsewhere) and summarised in the README.

Each test writes its own section; a section is replaced whole, so a rerun of one test updates
its figures and leaves the others as they were.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def report_path() -> Path:
    return Path(os.environ.get("MMDEMO_REPORT", ROOT / "reports" / "reliability.json"))


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

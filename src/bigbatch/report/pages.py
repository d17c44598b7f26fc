"""Run reports: `bigbatch report RUN_DIR` and `bigbatch compare RUN_DIR... --out FILE.html`.

A report is one self-contained HTML file (CSS and PNG plots inlined, no scripts, no fetches) built
from what `bigbatch train` leaves in its run directory. Reading the directory: data.py;
the summary: summary.py; plots: plots.py; page layout: html.py.
"""

from __future__ import annotations

import os
from pathlib import Path

from bigbatch.errors import UsageError
from bigbatch.report.data import load_run, run_labels
from bigbatch.report.html import compare_page, report_page
from bigbatch.report.plots import figures
from bigbatch.report.summary import status, summarize

REPORT_NAME = "report.html"


def check_out(out: Path) -> None:
    if out.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"--out {str(out)!r} must name an .html file")
    if not out.parent.is_dir():
        raise UsageError(f"--out {str(out)!r}: the folder {str(out.parent)!r} does not exist")


def write_html(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # a reader never sees half a page
    return path


def write_report(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Write RUN_DIR/report.html (or `out`) and return its path."""
    run = load_run(run_dir)
    out = Path(out) if out else run.run_dir / REPORT_NAME
    check_out(out)
    return write_html(out, report_page(run, summarize(run), status(run), figures([run])))


def write_compare(run_dirs: list[Path | str], out: Path | str) -> Path:
    """Overlay the curves of several runs in one page, with a table of their summaries."""
    if len(run_dirs) < 2:
        raise UsageError(f"compare needs at least two run directories, got {len(run_dirs)}")
    out = Path(out)
    check_out(out)
    dirs = [Path(d) for d in run_dirs]
    runs = [load_run(d, label) for d, label in zip(dirs, run_labels(dirs), strict=True)]
    return write_html(out, compare_page(runs, [summarize(r) for r in runs], figures(runs)))

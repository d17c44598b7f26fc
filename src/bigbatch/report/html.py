"""The report's page: one HTML file with its CSS inline, no scripts and no external resources,
so it opens offline, from disk, anywhere. Every text from the run is escaped."""

from __future__ import annotations

import datetime
from html import escape

from bigbatch.report.data import RunData
from bigbatch.report.plots import Figure

CSS = """
:root { --ink: #1f2328; --muted: #59636e; --line: #d1d9e0; --bg: #f6f8fa; --ok: #1a7f37;
        --warn: #9a6700; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--ink); background: white; }
header { padding: 24px 32px 16px; border-bottom: 1px solid var(--line); background: var(--bg); }
header h1 { margin: 0 0 4px; font-size: 22px; }
header .path { color: var(--muted); font-family: ui-monospace, monospace; font-size: 13px; }
main { padding: 8px 32px 40px; max-width: 1500px; }
h2 { font-size: 18px; margin: 28px 0 12px; padding-bottom: 4px;
     border-bottom: 1px solid var(--line); }
.status { display: inline-block; margin-top: 8px; padding: 2px 10px; border-radius: 12px;
          font-size: 13px; font-weight: 600; color: white; }
.status.ok { background: var(--ok); } .status.warn { background: var(--warn); }
table { border-collapse: collapse; font-size: 14px; }
th, td { text-align: left; vertical-align: top; padding: 5px 12px;
         border-bottom: 1px solid var(--line); }
th { color: var(--muted); font-weight: 600; white-space: nowrap; }
table.runs th { white-space: nowrap; }
table.runs td.num { text-align: right; font-variant-numeric: tabular-nums; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 20px; }
figure { margin: 0; padding: 12px; border: 1px solid var(--line); border-radius: 8px; }
figure h3 { margin: 0 0 6px; font-size: 15px; }
figure img { display: block; width: 100%; height: auto; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 6px; }
pre { background: var(--bg); border: 1px solid var(--line); border-radius: 8px; padding: 12px;
      font-size: 13px; overflow-x: auto; }
.notes li { color: var(--warn); }
details summary { cursor: pointer; font-weight: 600; margin: 8px 0; }
footer { color: var(--muted); font-size: 12px; padding: 0 32px 24px; }
"""


def _page(title: str, header: str, body: str) -> str:
    made = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f"<header>{header}</header>\n<main>\n{body}\n</main>\n"
            f"<footer>Written by bigbatch on {made}; self-contained: opens offline.</footer>\n"
            "</body>\n</html>\n")


def _figures(figures: list[Figure]) -> str:
    if not figures:
        return "<p>No metrics logged yet: nothing to plot.</p>"
    cells = [f"<figure id=\"plot-{f.key}\" class=\"plot\"><h3>{escape(f.title)}</h3>"
             f"<img alt=\"{escape(f.title)}\" src=\"data:image/png;base64,{f.png_base64}\">"
             f"<figcaption>{escape(f.caption)}</figcaption></figure>" for f in figures]
    return "<div class=\"grid\">\n" + "\n".join(cells) + "\n</div>"


def _notes(run: RunData) -> str:
    if not run.notes:
        return ""
    return "<ul class=\"notes\">" + "".join(f"<li>{escape(n)}</li>" for n in run.notes) + "</ul>"


def _plan_details(run: RunData) -> str:
    if run.plan is None:
        return ""
    from bigbatch.planning.planner import describe_plan
    from bigbatch.planning.search import MemoryPlan

    fields = dict(run.plan)
    if "sharding" in fields:  # plan.json written before the DDP/FSDP choice was one name
        fields["strategy"] = fields.pop("sharding")
    try:  # plan.json of another bigbatch version may not fit today's MemoryPlan
        lines = describe_plan(MemoryPlan(**fields))
    except (TypeError, KeyError, ValueError):
        return ""
    return (f"<details><summary>Memory plan (plan.json)</summary><pre>"
            f"{escape(chr(10).join(lines))}</pre></details>")


def report_page(run: RunData, summary: dict[str, str], status: tuple[str, str],
                figures: list[Figure]) -> str:
    css_class, sentence = status
    header = (f"<h1>bigbatch run: {escape(run.label)}</h1>"
              f"<div class=\"path\">{escape(str(run.run_dir.resolve()))}</div>"
              f"<span class=\"status {css_class}\">{escape(sentence)}</span>")
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>"
                   for k, v in summary.items())
    body = (f"<section id=\"summary\"><h2>Summary</h2>{_notes(run)}<table>{rows}</table>"
            f"{_plan_details(run)}</section>\n"
            f"<section id=\"plots\"><h2>Plots</h2>{_figures(figures)}</section>\n"
            f"<section id=\"config\"><h2>Resolved config</h2>"
            f"<pre>{escape(run.config_text or '(config.toml missing)')}</pre></section>")
    return _page(f"bigbatch report: {run.label}", header, body)


# Columns of the comparison table: summary keys, with the short heading shown for each.
COMPARE_COLUMNS = [("parameters", "parameters"), ("global batch", "global batch"),
                   ("tokens seen", "tokens seen"), ("final validation loss", "final val loss"),
                   ("best validation loss", "best val loss"),
                   ("mean tokens/s", "tokens/s"), ("precision", "precision"),
                   ("duration", "duration"), ("status", "status")]


def compare_page(runs: list[RunData], summaries: list[dict[str, str]],
                 figures: list[Figure]) -> str:
    header = (f"<h1>bigbatch comparison of {len(runs)} runs</h1>"
              f"<div class=\"path\">{escape(', '.join(r.label for r in runs))}</div>")
    head = "".join(f"<th>{escape(name)}</th>" for _, name in COMPARE_COLUMNS)
    rows = []
    for index, (run, summary) in enumerate(zip(runs, summaries, strict=True)):
        # the colour swatch matches the run's colour in every plot (matplotlib's C0, C1, ...)
        cells = "".join(f"<td>{escape(summary.get(key, '—'))}</td>" for key, _ in COMPARE_COLUMNS)
        rows.append(f"<tr><th><span style=\"color:{_tab10(index)}\">&#9632;</span> "
                    f"{escape(run.label)}</th>{cells}</tr>")
    configs = "".join(f"<details><summary>{escape(run.label)}</summary>"
                      f"<pre>{escape(run.config_text or '(config.toml missing)')}</pre></details>"
                      for run in runs)
    notes = "".join(_notes(run) for run in runs)
    body = (f"<section id=\"summary\"><h2>Summary</h2>{notes}<div style=\"overflow-x:auto\">"
            f"<table class=\"runs\"><tr><th>run</th>{head}</tr>{''.join(rows)}</table></div>"
            f"</section>\n<section id=\"plots\"><h2>Plots</h2>{_figures(figures)}</section>\n"
            f"<section id=\"config\"><h2>Resolved configs</h2>{configs}</section>")
    return _page("bigbatch comparison", header, body)


def _tab10(index: int) -> str:
    from matplotlib.colors import to_hex

    return to_hex(f"C{index % 10}")  # the colour the plots give run `index`

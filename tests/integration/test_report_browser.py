"""The report in a real browser: headless Chromium (Debian's `chromium`, which `make test` installs
where it can) opens report.html from disk, with every host name unresolvable, and:

- the page logs nothing to the console (it has no scripts, so any message is an error: a blocked
  resource, a bad data URI, a parse problem);
- it fetches nothing: the Resource Timing list of an instrumented copy is empty;
- every plot decodes (naturalWidth > 0) and its region of a screenshot is not blank.

A control page that logs on purpose proves the console capture works, so "no messages" means
something. Chromium's command line has no JSON console API, so messages are read from its
`--enable-logging=stderr` output (`INFO:CONSOLE(...)` lines), without an extra driver package.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bigbatch.config.files import config_to_toml
from bigbatch.report.pages import write_compare, write_report
from report_runs import make_run, synthetic_rows
from small_runs import small_config

pytestmark = pytest.mark.usefixtures("single_thread")

WIDTH = 1400
PROBE = "BIGBATCH-PROBE "
# Read after the load event: where each plot landed, whether it decoded, what was fetched.
PROBE_SCRIPT = """<script>
window.addEventListener("load", () => {
  const plots = [...document.querySelectorAll("figure.plot img")].map(img => {
    const r = img.getBoundingClientRect();
    return {id: img.closest("figure").id, x: r.left + scrollX, y: r.top + scrollY,
            w: r.width, h: r.height, natural: img.naturalWidth};
  });
  const fetched = performance.getEntriesByType("resource").map(e => e.name);
  console.log("PROBE_TAG" + JSON.stringify({height: document.documentElement.scrollHeight, plots,
                                     fetched}));
});
</script>""".replace("PROBE_TAG", PROBE)
CONSOLE = re.compile(r":CONSOLE[:(\d)]*\] (.*)$", re.M)


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no Chromium on PATH, and the test set-up could not install it "
                "(`apt-get install chromium` as root; `make test` tries)")


def open_page(page: Path, height: int, screenshot: Path | None = None) -> list[str]:
    """Load `page` from disk in headless Chromium; return its console messages."""
    argv = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--force-device-scale-factor=1", "--enable-logging=stderr", "--v=0",
            "--host-resolver-rules=MAP * ~NOTFOUND",  # a network fetch could not succeed
            f"--window-size={WIDTH},{height}", f"--user-data-dir={page.parent / 'profile'}"]
    if screenshot is not None:
        argv.append(f"--screenshot={screenshot}")
    else:
        argv.append("--dump-dom")  # loads the page, runs its load handlers, then exits
    done = subprocess.run([*argv, page.resolve().as_uri()], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return CONSOLE.findall(done.stderr)


@pytest.fixture(scope="module", params=["report", "compare"])
def report(request, tmp_path_factory, tiny_overrides) -> Path:
    """The report of a run that logged every metric (all nine kinds of plot), and a comparison
    of two such runs."""
    tmp = tmp_path_factory.mktemp("browser")
    config_text = config_to_toml(small_config(tiny_overrides))
    runs = [make_run(tmp, None, synthetic_rows(clip_logged=clipped), name=f"run{i}",
                     config_text=config_text) for i, clipped in enumerate((False, True))]
    if request.param == "report":
        return write_report(runs[0])
    return write_compare(runs, tmp / "compare.html")


def test_console_capture_sees_a_logged_message(tmp_path):
    control = tmp_path / "control.html"
    control.write_text("<!DOCTYPE html><title>c</title><script>console.error('seen')</script>")
    assert any("seen" in message for message in open_page(control, 600))


def test_report_renders_offline_without_console_errors_and_shows_its_plots(report, tmp_path):
    probe = tmp_path / "probe.html"  # an instrumented copy; the report itself is left as is
    probe.write_text(report.read_text().replace("</body>", PROBE_SCRIPT + "</body>"))
    lines = [m for m in open_page(probe, 1000) if m.startswith(f'"{PROBE}')]
    assert len(lines) == 1, lines
    layout = json.loads(lines[0][len(PROBE) + 1:lines[0].rindex('"')])
    assert layout["fetched"] == []
    # The nine kinds of plot; a comparison adds validation loss against steps (its runs may
    # follow different batch schedules).
    assert len(layout["plots"]) == (10 if report.name == "compare.html" else 9)
    for plot in layout["plots"]:
        assert plot["natural"] > 0 and plot["w"] > 300 and plot["h"] > 150, plot

    shot = tmp_path / "report.png"
    height = int(layout["height"]) + 10
    assert open_page(report, height, screenshot=shot) == []  # no console message at all
    image = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert image.shape == (height, WIDTH)
    for plot in layout["plots"]:
        x, y, w, h = (int(round(plot[k])) for k in ("x", "y", "w", "h"))
        region = image[y:y + h, x:x + w]
        ink = (region < 200).mean()  # share of pixels darker than the light page background
        assert region.std() > 20 and 0.01 < ink < 0.6, (plot["id"], region.std(), ink)

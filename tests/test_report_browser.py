"""The HTML report in a real headless browser (Debian's ``chromium``).

``test_report.py`` checks the page's text; only a browser shows whether it works when opened. Here a small
run's ``report.html`` is loaded from a ``file://`` copy with a check script appended, and the DOM that
chromium dumps afterwards says: every figure decoded (complete, non-zero natural size, laid out, a
``data:`` URI, shown at its natural pixel size, a link to its full-window view), the expected figures are
all there, the scatter plots sit side by side, every table has rows as wide as its header, a click on
a numeric header sorts ascending and a second click descending, a click on a figure opens it over the
whole window, the collapsed provenance section holds the key facts and the run's manifest, and nothing
is fetched or referenced over a network (hosts are unresolvable while it runs). A screenshot at 1400 px
shows the page paints something.

``.ci/run`` installs chromium when it is missing and then sets ``FLUENCY_REQUIRE_BROWSER=1``, which turns
the skip (no browser here) into a failure, so CI cannot pass without running this test.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fluency
from fluency.core.outputs.report import build_report

#: where Debian's package puts it, in case it is not on PATH
CHROMIUM = Path("/usr/bin/chromium")
#: seconds one chromium call may take before its whole process group is killed
TIMEOUT = 60
#: figure families this run must show (alt text = file stem; ``*`` = the checkpoint label or an index)
EXPECTED_FIGURES = ("heatmap-pearson", "heatmap-spearman", "ridge-r2", "scatter-*", "activations-*", "recon-*",
                    "curves-*", "latents-pca-*", "interp-*")

#: runs after the page's own script, once every image has loaded; writes what it saw into <pre id=browser-check>
CHECK_JS = """
window.addEventListener('load', function () {
  var out = {images: [], tables: [], resources: [], provenance: null};
  Array.from(document.images).forEach(function (img) {
    var box = img.getBoundingClientRect(), link = img.parentElement;
    out.images.push({alt: img.alt, complete: img.complete, width: img.naturalWidth, height: img.naturalHeight,
                     shown: box.width > 0 && box.height > 0, scheme: img.src.split(':')[0],
                     shownWidth: box.width, shownHeight: box.height, top: box.top + window.scrollY,
                     left: box.left, link: link.tagName === 'A' ? link.getAttribute('href') : null,
                     figure: link.parentElement.id});
  });
  function column(table, i) {
    return Array.from(table.tBodies[0].rows).map(function (r) {
      var c = r.cells[i]; return c.dataset.v || c.textContent; });
  }
  document.querySelectorAll('table').forEach(function (table) {
    var heads = Array.from(table.tHead ? table.tHead.rows[0].cells : []).map(function (th) { return th.textContent; });
    var rows = table.tBodies.length ? Array.from(table.tBodies[0].rows) : [];
    var entry = {id: table.id, sortable: table.classList.contains('sortable'), heads: heads, rows: rows.length,
                 cells: rows.map(function (r) { return r.cells.length; })};
    var key = ['estimate', 'mean', 'p'].map(function (h) { return heads.indexOf(h); })
                                       .filter(function (i) { return i >= 0; })[0];
    if (entry.sortable && key !== undefined && rows.length > 1) {
      var th = table.tHead.rows[0].cells[key];
      entry.key = heads[key];
      entry.before = column(table, key);
      th.click(); entry.first = column(table, key);
      th.click(); entry.second = column(table, key);
    }
    out.tables.push(entry);
  });
  var section = document.querySelector('details#provenance');
  if (section) {
    var manifest = section.querySelector('details pre#manifest');
    out.provenance = {open: section.open, summary: section.querySelector('summary').textContent,
                      height: section.getBoundingClientRect().height,
                      facts: Array.from(section.querySelectorAll('table.facts tbody th')).map(function (th) {
                        return th.textContent; }),
                      manifest: manifest ? manifest.textContent : null};
  }
  var zoom = document.querySelector('figure a[href^="#fig-scatter"]');
  if (zoom) {
    zoom.click();
    var target = document.querySelector(zoom.getAttribute('href')), box = target.getBoundingClientRect();
    out.zoom = {hash: location.hash, position: getComputedStyle(target).position, width: box.width,
                height: box.height, viewport: [document.documentElement.clientWidth, document.documentElement.clientHeight]};
    location.hash = '#_';
    out.zoom.after = getComputedStyle(target).position;
  }
  out.external = document.querySelectorAll('[src^="http"],[href^="http"],[src^="//"],[href^="//"]').length;
  out.resources = performance.getEntriesByType('resource').map(function (e) { return e.name; });
  var pre = document.createElement('pre');
  pre.id = 'browser-check';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
"""


def find_chromium() -> str:
    """The chromium binary, or skip (fail when ``FLUENCY_REQUIRE_BROWSER=1``, as CI sets after installing it)."""
    path = shutil.which("chromium") or (str(CHROMIUM) if CHROMIUM.exists() else None)
    if path is None:
        why = ("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it), "
               "so the report is not checked in a real browser")
        if os.environ.get("FLUENCY_REQUIRE_BROWSER") == "1":
            pytest.fail(f"FLUENCY_REQUIRE_BROWSER=1 but {why}")
        pytest.skip(why)
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small run on the embedded default with every kind of report figure and three analyses."""
    out = tmp_path_factory.mktemp("browser") / "run"
    fluency.run(metrics=["gini"], analyses=["pearson", "spearman", "ridge"], out=out, progress=False,
                options=["ridge.permutations=5", "ridge.repeats=2", "pearson.n_boot=200", "spearman.n_boot=200"])
    return build_report(out)


def chromium(binary: str, profile: Path, *args: str) -> str:
    """Run headless chromium (fresh profile, every host unresolvable) and return its stdout.

    It runs in its own process group, killed as a whole afterwards, so no renderer or zygote outlives it,
    not even after a timeout.
    """
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
               "--disable-extensions", "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={profile}",
               *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"chromium took more than {TIMEOUT} s: {' '.join(command)}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the whole group is gone already
            pass
    assert proc.returncode == 0, stderr[-2000:]
    return stdout


def test_report_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    binary = find_chromium()
    source = report.read_text()
    assert "</body>" in source
    page = tmp_path / "report-checked.html"  # a copy with the check script added; the report itself is untouched
    page.write_text(source.replace("</body>", f"<script>{CHECK_JS}</script></body>"))
    dom = chromium(binary, tmp_path / "profile", "--virtual-time-budget=5000", "--window-size=1400,2000", "--dump-dom",
                   page.as_uri())
    found = re.search(r'<pre id="browser-check">(.*?)</pre>', dom, re.S)
    assert found, f"the check script did not run; DOM starts {dom[:300]!r}"
    seen = json.loads(html.unescape(found.group(1)))

    # every figure: decoded (complete, non-zero natural size), laid out, embedded as data: URI; all expected there
    n_img = len(re.findall(r"<img\b", source))
    assert len(seen["images"]) == n_img
    bad = [i for i in seen["images"] if not (i["complete"] and i["width"] > 0 and i["height"] > 0 and i["shown"])]
    assert not bad, f"figures that did not render: {bad}"
    assert {i["scheme"] for i in seen["images"]} == {"data"}
    # at natural size (never scaled down, so figure text keeps its size), each a link to its full-window view
    scaled = [i["alt"] for i in seen["images"] if (i["shownWidth"], i["shownHeight"]) != (i["width"], i["height"])]
    assert not scaled, f"figures not shown at their natural size: {scaled}"
    assert all(i["link"] == f"#{i['figure']}" and i["figure"] == f"fig-{i['alt']}" for i in seen["images"])
    # scatter plots side by side in a grid that uses the page's width
    scatter = [i for i in seen["images"] if i["alt"].startswith("scatter-")]
    assert len(scatter) >= 3 and scatter[0]["top"] == scatter[1]["top"] == scatter[2]["top"], scatter[:3]
    assert scatter[0]["left"] < scatter[1]["left"] < scatter[2]["left"]
    # a click on a figure shows it over the whole window; leaving the fragment puts it back
    zoom = seen["zoom"]
    assert zoom["hash"].startswith("#fig-scatter") and zoom["position"] == "fixed", zoom
    assert [zoom["width"], zoom["height"]] == zoom["viewport"] and zoom["after"] == "static", zoom
    alts = [i["alt"] for i in seen["images"]]
    missing = [f for f in EXPECTED_FIGURES if not any(re.fullmatch(f.replace("*", ".+"), a) for a in alts)]
    assert not missing, f"figures missing from the report: {missing} (it has {alts})"
    assert n_img >= 12, alts  # 2 heatmaps, ridge bars, 6 scatter plots, activations, 4 model views

    # every table: the expected ones, each with rows, each row as wide as the header
    tables = {t["id"]: t for t in seen["tables"]}
    assert {"table-pearson", "table-spearman", "table-ridge", "table-metrics"} <= set(tables)
    for t in seen["tables"]:
        assert (t["sortable"] or t["id"] == "table-provenance") and t["rows"] > 0 and t["heads"], t["id"]
        assert set(t["cells"]) == {len(t["heads"])}, t["id"]

    # sorting: the first click sorts ascending, the second descending, the rows are only reordered
    checked = [t for t in seen["tables"] if "first" in t]
    assert {"table-pearson", "table-spearman", "table-metrics"} <= {t["id"] for t in checked}
    moved = 0
    for t in checked:
        first, second = [float(v) for v in t["first"]], [float(v) for v in t["second"]]
        assert first == sorted(first), (t["id"], t["key"], "not ascending after one click")
        assert second == sorted(second, reverse=True), (t["id"], t["key"], "not descending after two clicks")
        assert sorted(t["before"]) == sorted(t["first"]) == sorted(t["second"])
        moved += t["before"] != t["first"]
    assert moved, "no table changed order when sorted"

    # provenance: collapsed (a summary line, not a page of JSON), key facts in a table, the whole manifest inside
    provenance = seen["provenance"]
    assert provenance and provenance["manifest"], "no details#provenance holding pre#manifest"
    assert not provenance["open"] and provenance["summary"] == "Provenance" and provenance["height"] < 60
    assert {"fluency version", "date", "command", "checkpoints", "stimuli", "metrics", "analyses",
            "seed"} <= set(provenance["facts"])
    manifest = json.loads((report.parent / "manifest.json").read_text())
    assert json.loads(provenance["manifest"])["run_id"] == manifest["run_id"]

    # self-contained: nothing fetched, no http(s) reference anywhere in the page
    assert seen["external"] == 0
    assert not [r for r in seen["resources"] if re.match(r"https?:", r)], seen["resources"]
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", source, re.I)
    assert "http://" not in source and "https://" not in source


def test_report_screenshot_is_not_blank(report: Path, tmp_path: Path) -> None:
    binary = find_chromium()
    shot = tmp_path / "report.png"
    chromium(binary, tmp_path / "profile", "--virtual-time-budget=5000", "--hide-scrollbars",
             f"--screenshot={shot}", "--window-size=1400,2000", report.as_uri())
    assert shot.exists(), "chromium wrote no screenshot"
    with Image.open(shot) as image:
        assert image.size == (1400, 2000)
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    assert pixels.std() > 10, "the screenshot is (nearly) one colour"
    assert (pixels < 128).mean() > 0.01, "hardly anything dark is painted: no text or figures"


def test_a_missing_browser_skips_here_and_fails_where_it_is_required(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.delenv("FLUENCY_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="chromium is not installed"):
        find_chromium()
    monkeypatch.setenv("FLUENCY_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="FLUENCY_REQUIRE_BROWSER=1"):
        find_chromium()

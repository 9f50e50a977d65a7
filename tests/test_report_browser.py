"""The HTML report in a real headless browser (Debian's ``chromium``): every figure decodes, every table
has rows, the sortable tables sort when a header is clicked, and nothing is fetched from a network.

``.ci/run`` installs chromium when it is missing and then sets ``FLUENCY_REQUIRE_BROWSER=1``, which
turns the skip (no browser here) into a failure, so CI cannot pass without running this test.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fluency
from fluency.core.report import build_report

#: where Debian's package puts it, in case it is not on PATH
CHROMIUM = Path("/usr/bin/chromium")

#: runs after the page's own script, once every image has loaded; writes what it saw into <pre id=browser-check>
CHECK_JS = """
window.addEventListener('load', function () {
  var out = {images: [], tables: [], resources: []};
  Array.from(document.images).forEach(function (img) {
    var box = img.getBoundingClientRect();
    out.images.push({alt: img.alt, complete: img.complete, width: img.naturalWidth, height: img.naturalHeight,
                     shown: box.width > 0 && box.height > 0, scheme: img.src.split(':')[0]});
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


def render(chromium: str, page: Path, profile: Path) -> str:
    """The DOM after the page's scripts ran, from headless chromium with every host unresolvable."""
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-extensions", "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={profile}",
         "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_report_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    chromium = find_chromium()
    source = report.read_text()
    assert "</body>" in source
    page = tmp_path / "report-checked.html"  # a copy with the check script added; the report itself is untouched
    page.write_text(source.replace("</body>", f"<script>{CHECK_JS}</script></body>"))
    dom = render(chromium, page, tmp_path / "profile")
    found = re.search(r'<pre id="browser-check">(.*?)</pre>', dom, re.S)
    assert found, f"the check script did not run; DOM starts {dom[:300]!r}"
    seen = json.loads(html.unescape(found.group(1)))

    # every figure: decoded (complete, non-zero natural size), laid out, embedded as data: URI
    n_img = len(re.findall(r"<img\b", source))
    assert n_img >= 8 and len(seen["images"]) == n_img
    bad = [i for i in seen["images"] if not (i["complete"] and i["width"] > 0 and i["height"] > 0 and i["shown"])]
    assert not bad, f"figures that did not render: {bad}"
    assert {i["scheme"] for i in seen["images"]} == {"data"}

    # every table: the expected ones, each with rows, each row as wide as the header
    tables = {t["id"]: t for t in seen["tables"]}
    assert {"table-pearson", "table-spearman", "table-ridge", "table-metrics"} <= set(tables)
    for t in seen["tables"]:
        assert t["rows"] > 0 and t["heads"], t["id"]
        assert set(t["cells"]) == {len(t["heads"])}, t["id"]

    # sorting: the first click sorts ascending, the second descending, the rows are only reordered
    checked = [t for t in seen["tables"] if "first" in t]
    assert {"table-pearson", "table-spearman", "table-metrics"} <= {t["id"] for t in checked}
    moved = 0
    for t in checked:
        first, second = [float(v) for v in t["first"]], [float(v) for v in t["second"]]
        assert first == sorted(first), (t["id"], t["key"])
        assert second == sorted(second, reverse=True), (t["id"], t["key"])
        assert sorted(t["before"]) == sorted(t["first"]) == sorted(t["second"])
        moved += t["before"] != t["first"]
    assert moved, "no table changed order when sorted"

    # self-contained: nothing fetched, no http(s) reference anywhere in the page
    assert not [r for r in seen["resources"] if re.match(r"https?:", r)], seen["resources"]
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", source, re.I)
    assert "http://" not in source and "https://" not in source


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

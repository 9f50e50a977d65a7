"""docs/metrics.md and docs/interpreting.md say what the code does and what statistics says.

- the metrics table lists every built-in metric with the direction its code declares;
- the pages hold no command that a test does not run: no shell blocks, and every inline ``fluency ...`` or
  ``-o PLUGIN.KEY=...`` names a real command, flag and option;
- the power figures of interpreting.md hold against oracles other than the formula the page used (the exact
  null distribution of r, and Monte Carlo simulation);
- links between the pages point at headings that exist.
"""

from __future__ import annotations

import re
import shlex
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = ("metrics.md", "interpreting.md")
DIRECTION = {"more fluent": True, "less fluent": False, "no direction": None}


def page(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def glance_rows() -> dict[str, str]:
    """``{metric: its "higher =" cell}`` of metrics.md's "At a glance" table."""
    text = page("metrics.md")
    table = text[text.index("## At a glance"):text.index("## Directions")]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[2]
    return rows


def builtin_metrics() -> dict[str, object]:
    from fluency.core.plugin.manager import PluginManager

    manager = PluginManager(autoload=False)
    return {name: manager.get("metric", name) for name in manager.names("metric")}


def test_every_builtin_metric_is_documented_with_its_declared_direction() -> None:
    specs, rows, text = builtin_metrics(), glance_rows(), page("metrics.md")
    assert set(rows) == set(specs)
    for name, spec in specs.items():
        assert f"### `{name}`" in text, f"metrics.md has no section for {name}"
        documented = DIRECTION[rows[name]]
        declared = spec.higher_is_more_fluent
        assert declared == documented, (name, declared, rows[name])


def inline_code(text: str) -> list[str]:
    """Inline code spans outside fenced blocks."""
    outside = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    return re.findall(r"`([^`\n]+)`", outside)


@pytest.mark.parametrize("name", PAGES)
def test_the_pages_hold_no_shell_commands(name: str) -> None:
    fences = re.findall(r"```(\w*)\n(.*?)```", page(name), flags=re.DOTALL)
    for language, code in fences:
        assert language not in ("bash", "sh", "shell", "console"), f"{name}: a {language} block no test runs"
        assert not any(line.strip().startswith(("fluency ", "$ ")) for line in code.splitlines()), name


def _command(cli, words: list[str]):
    """The click command that ``fluency WORDS...`` reaches, and the words left for it."""
    import click

    command = cli
    while isinstance(command, click.Group) and words and words[0] in command.commands:
        command, words = command.commands[words[0]], words[1:]
    assert not isinstance(command, click.Group), f"fluency {' '.join(words)}: not a command"
    return command, words


def _check_option(manager, setting: str, where: str) -> None:
    """``[KIND.]PLUGIN.KEY=VALUE`` names an option a plugin declares."""
    target = setting.split("=", 1)[0]
    parts = target.split(".")
    kinds = [parts[0]] if len(parts) == 3 else ["architecture", "constraint", "optimizer", "metric", "analysis"]
    plugin, key = parts[-2], parts[-1]
    options = [manager.get(kind, plugin).options for kind in kinds if plugin in manager.names(kind)]
    assert options, f"{where}: -o {setting}: no plugin {plugin!r}"
    assert any(key in o for o in options), f"{where}: -o {setting}: {plugin} has no option {key!r}"


@pytest.mark.parametrize("name", PAGES)
def test_inline_commands_and_options_exist(name: str) -> None:
    from fluency.cli import cli
    from fluency.core.plugin.manager import PluginManager

    manager = PluginManager(autoload=False)
    checked = 0
    for span in inline_code(page(name)):
        if span.startswith("fluency "):
            command, words = _command(cli, shlex.split(span)[1:])
            flags = {opt for param in command.params for opt in param.opts + param.secondary_opts}
            for word in words:
                if word.startswith("-") and not word.lstrip("-").isdigit():
                    assert word.split("=", 1)[0] in flags, f"{name}: `{span}`: no flag {word}"
            settings = [b for a, b in pairwise(words) if a == "-o"]
        elif span.startswith("-o "):
            settings = [shlex.split(span)[1]]
        else:
            continue
        for setting in settings:
            _check_option(manager, setting, name)
        checked += 1
    if name == "metrics.md":
        assert checked >= 10  # the page's many `-o gini.…` and `fluency run …` mentions were all read


# ---- interpreting.md: the numbers ------------------------------------------------------------------------------

def power_table() -> dict[int, tuple[float, float]]:
    """``{n: (|r| for p < .05, r detected with 80 % power)}`` as interpreting.md prints them."""
    rows = re.findall(r"^\| (\d+) \| (0\.\d+) \| (0\.\d+) \|$", page("interpreting.md"), flags=re.MULTILINE)
    return {int(n): (float(a), float(b)) for n, a, b in rows}


def simulated_power(r: float, n: int, draws: int, seed: int) -> float:
    """Share of ``draws`` bivariate normal samples of size ``n`` with correlation ``r`` that pearsonr's test
    rejects at α = .05 (two-sided); p-values from scipy's exact null distribution of r."""
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, draws, 2000):
        m = min(2000, draws - start)
        x = rng.standard_normal((m, n))
        y = r * x + np.sqrt(1 - r * r) * rng.standard_normal((m, n))
        xc, yc = x - x.mean(1, keepdims=True), y - y.mean(1, keepdims=True)
        sample_r = (xc * yc).sum(1) / np.sqrt((xc ** 2).sum(1) * (yc ** 2).sum(1))
        p = 2 * stats.beta(n / 2 - 1, n / 2 - 1).sf((np.abs(sample_r) + 1) / 2)
        hits += int((p < 0.05).sum())
    return hits / draws


def test_the_power_table_covers_the_london_and_chicago_sizes() -> None:
    assert set(power_table()) == {102, 800}


def test_critical_r_matches_the_exact_null_distribution() -> None:
    # under H0, (r + 1) / 2 ~ Beta(n/2 − 1, n/2 − 1): an oracle that does not use the t distribution
    for n, (critical, _) in power_table().items():
        exact = 2 * stats.beta(n / 2 - 1, n / 2 - 1).ppf(0.975) - 1
        assert abs(critical - exact) < 0.0006, (n, critical, exact)


def test_the_interval_of_a_null_estimate_and_the_spearman_brown_example() -> None:
    text = page("interpreting.md")
    half_width = float(re.search(r"estimate of 0 has a 95 % interval of about ±(0\.\d+)", text).group(1))
    exact = 2 * stats.beta(50, 50).ppf(0.975) - 1  # n = 102: the central 95 % of r under H0
    assert round(exact, 2) == half_width
    k, rho, quoted = 2513, 0.1, float(re.search(r"2512 · 0\.1\) = (0\.\d+)", text).group(1))
    assert round(k * rho / (1 + (k - 1) * rho), 3) == quoted


def test_minimum_detectable_r_has_80_percent_power_in_simulation() -> None:
    # 20,000 draws: Monte Carlo SD of a power near .8 is 0.003; Fisher's z is an approximation, so ±0.015
    for n, (_, detectable) in power_table().items():
        draws = 20_000 if n < 500 else 6_000
        assert simulated_power(detectable, n, draws, seed=n) == pytest.approx(0.80, abs=0.015), n


def test_the_quoted_powers_at_r_point_2_and_point_1() -> None:
    text = page("interpreting.md")
    quoted = re.search(r"true r of 0\.2 is detected about half the time \((\d+) %\) and a\s+true r of 0\.1 about "
                       r"one time in six \((\d+) %\)", text)
    assert quoted, "interpreting.md no longer quotes the powers at r = 0.2 and 0.1"
    for r, percent in zip((0.2, 0.1), map(int, quoted.groups())):
        assert simulated_power(r, 102, 20_000, seed=7) == pytest.approx(percent / 100, abs=0.015), r


def test_in_sample_r2_of_noise_averages_k_over_n_minus_1() -> None:
    text = page("interpreting.md")
    one, five = map(float, re.search(r"\((0\.\d+) for one predictor and (0\.\d+) for five, at n = 102\)",
                                     text).groups())
    rng = np.random.default_rng(0)
    n = 102
    for k, quoted in ((1, one), (5, five)):
        r2 = []
        for _ in range(3000):
            x = np.column_stack([np.ones(n), rng.standard_normal((n, k))])
            y = rng.standard_normal(n)
            resid = y - x @ np.linalg.lstsq(x, y, rcond=None)[0]
            r2.append(1 - resid @ resid / ((y - y.mean()) @ (y - y.mean())))
        # the mean of 3000 draws is within 3 SE of the truth; the quote is rounded
        se = np.std(r2) / np.sqrt(len(r2))
        assert abs(np.mean(r2) - quoted) < 3 * se + 0.0006, (k, np.mean(r2), quoted)


# ---- links ----------------------------------------------------------------------------------------------------

def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), flags=re.MULTILINE)}


@pytest.mark.parametrize("source", ["docs/metrics.md", "docs/interpreting.md", "docs/user-guide.md", "docs/models.md",
                                    "README.md"])
def test_links_to_the_pages_resolve(source: str) -> None:
    path = ROOT / source
    for target, anchor in re.findall(r"\]\(([\w./-]*\.md)?#([\w-]+)\)", path.read_text(encoding="utf-8")):
        file = (path.parent / target) if target else path
        assert file.is_file(), f"{source}: link to missing {target}"
        assert anchor in anchors(file), f"{source}: no heading #{anchor} in {file.name}"


def test_readme_and_guide_link_the_interpreting_page() -> None:
    assert "](docs/interpreting.md)" in (ROOT / "README.md").read_text(encoding="utf-8")
    assert "](interpreting.md)" in page("user-guide.md")

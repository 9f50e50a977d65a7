"""Every command in README.md and docs/ runs in a test, so the docs cannot drift from the code.

A shell block (```bash) is one of three kinds, said by an HTML comment on the line before its fence:

- no comment: this file runs its commands as written, in order, in a scratch folder per page that holds
  what the commands name (``faces/`` and ``ratings.csv``: twelve London faces with their ratings;
  ``../shared``: the shared data; the offline LPIPS backbone in ``FLUENCY_LPIPS_WEIGHTS``);
- ``<!-- doc-test: run by tests/test_x.py::test_name -->``: that test runs the block (with the fixtures it
  needs, e.g. tiny settings for a 30-epoch training); the test must exist and read that page;
- ``<!-- doc-test: exempt: REASON -->``: not run (it sets up an environment, needs SLURM or a GPU, or runs
  longer than a minute); the list is printed at the end of every test session that ran this file.
"""

from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from cli_env import fluency_cli
from conftest import LONDON_FACES, SHARED

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = ("bash", "sh", "shell", "console")
MARKER = re.compile(r"<!--\s*doc-test:\s*(.*?)\s*-->")
RUN_BY = re.compile(r"run by (tests/test_\w+\.py)::(test_\w+)")
#: faces of the scratch folder's faces/ (enough for every analysis, few enough to be quick)
N_FACES = 12


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository
    line: int  # of the opening fence
    commands: tuple[str, ...]  # backslash continuations joined
    marker: str | None  # the doc-test comment before the fence

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def shell_blocks(path: Path) -> list[Block]:
    """The shell blocks of a Markdown page, with the doc-test comment of each (if any)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = re.match(r"```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if fence.group(1) in SHELL:
            body = "\n".join(lines[i + 1:end]).replace("\\\n", " ")
            commands = tuple(c.strip() for c in body.splitlines() if c.strip() and not c.strip().startswith("#"))
            previous = MARKER.search(lines[i - 1]) if i else None
            found.append(Block(str(path.relative_to(ROOT)), i + 1, commands, previous.group(1) if previous else None))
        i = end + 1
    return found


BLOCKS = [block for page in PAGES for block in shell_blocks(page)]


def exempt_commands() -> list[tuple[str, str, str]]:
    """``(where, command, reason)`` of every command the docs test does not run."""
    return [(b.where, c, b.marker.split(":", 1)[1].strip()) for b in BLOCKS
            if b.marker and b.marker.startswith("exempt:") for c in b.commands]


def test_every_shell_block_is_run_or_exempt_with_a_reason() -> None:
    assert len(BLOCKS) >= 20 and any(b.marker is None for b in BLOCKS)
    for block in BLOCKS:
        assert block.commands, f"{block.where}: an empty shell block"
        if block.marker is None:
            continue
        if block.marker.startswith("exempt:"):
            assert len(block.marker.split(":", 1)[1].strip()) >= 10, f"{block.where}: exempt without a reason"
            continue
        run_by = RUN_BY.fullmatch(block.marker.split(" (", 1)[0].strip())
        assert run_by, f"{block.where}: unknown doc-test comment {block.marker!r}"
        test_file = ROOT / run_by.group(1)
        source = test_file.read_text(encoding="utf-8") if test_file.is_file() else ""
        assert f"def {run_by.group(2)}(" in source, f"{block.where}: {block.marker} names no existing test"
        assert Path(block.page).name in source, f"{block.where}: {run_by.group(1)} does not read {block.page}"


def test_the_documentation_has_no_unfinished_commands() -> None:
    for block in BLOCKS:
        for command in block.commands:
            assert "..." not in command and "…" not in command, f"{block.where}: {command!r} cannot run as written"


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder beside a ``shared`` link, with ``faces/``, ``ratings.csv``, offline LPIPS weights."""
    if not (LONDON_FACES / "ratings.csv").is_file() or not (SHARED / "weights").is_dir():
        pytest.skip(f"needs the shared data at {SHARED}")
    (tmp_path / "shared").symlink_to(SHARED.resolve(), target_is_directory=True)
    work = tmp_path / "work"
    (work / "faces").mkdir(parents=True)
    ratings = pd.read_csv(LONDON_FACES / "ratings.csv").head(N_FACES)
    for image_id in ratings["image_id"]:
        shutil.copy(LONDON_FACES / "images" / f"{image_id}.jpg", work / "faces")
    ratings.to_csv(work / "ratings.csv", index=False)
    monkeypatch.setenv("FLUENCY_LPIPS_WEIGHTS", str(SHARED / "weights" / "alexnet_imagenet_features.pth"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # nothing cached, nothing downloaded
    monkeypatch.chdir(work)
    return work


@pytest.mark.parametrize("page", sorted({b.page for b in BLOCKS if b.marker is None}))
def test_the_commands_of_the_page_run_as_written(page: str, scratch: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    for block in (b for b in BLOCKS if b.page == page and b.marker is None):
        for command in block.commands:
            words = shlex.split(command, comments=True)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=VALUE before the command
                name, _, value = words.pop(0).partition("=")
                monkeypatch.setenv(name, value)
            assert words[0] == "fluency", f"{block.where}: only fluency commands run here; mark {command!r}"
            code, _, err = fluency_cli(monkeypatch, capsys, *words[1:])
            assert code == 0, (block.where, command, err)

"""What the CLI-facing tests share: running ``readar`` on a work folder, checking a one-line error, reading the
tables of a generated HTML page, and a headless Chromium screenshot of one (Debian's ``chromium``; CI installs
it through tests/services.sh)."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from scheduler.cli import cli

CHROMIUM = "/usr/bin/chromium"
# The dark blue of every table header in the pages (metrics/reporting's style sheet).
HEADER_BLUE = (0x24, 0x46, 0x6B)

# Column headers of the pages' metric tables → fields of the stored metric rows.
METRIC_FIELDS = {"iAUROC": "iauroc", "pAUROC": "pauroc", "PRO": "pro", "PRO_hard": "pro_hard", "F1_max": "f1_max"}

Cell = tuple[str, dict[str, str | None]]


def invoke(work: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--work-dir", str(work), *args], catch_exceptions=False)


def ok(work: Path, *args: str) -> str:
    result = invoke(work, *args)
    assert result.exit_code == 0, result.output
    return result.output


def one_line_error(result: Result) -> str:
    """The one line a failed command printed (it must start with "Error: " and stand alone)."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


class TablePage(HTMLParser):
    """An HTML page as the tests read it: per table (by id) its rows of cells (text, attributes) and the rows'
    attributes; the pictures (``img src``) and other links (``a href`` outside the page); all text."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[Cell]]] = {}
        self.row_attributes: dict[str, list[dict[str, str | None]]] = {}
        self.images: list[str] = []
        self.anchors: list[str] = []
        self.text: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._attributes: dict[str, str | None] = {}

    @classmethod
    def read(cls, path: Path) -> TablePage:
        page = cls()
        page.feed(path.read_text(encoding="utf-8"))
        page.close()
        return page

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "img" and attributes.get("src"):
            self.images.append(attributes["src"] or "")
        if tag == "a" and attributes.get("href") and not (attributes["href"] or "").startswith("#"):
            self.anchors.append(attributes["href"] or "")
        if tag == "table":
            self._table = attributes.get("id") or f"table-{len(self.tables)}"
            self.tables[self._table], self.row_attributes[self._table] = [], []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
            self.row_attributes[self._table].append(attributes)
        elif tag in ("td", "th"):
            self._cell, self._attributes = [], attributes

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append(("".join(self._cell).strip(), self._attributes))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def data_value(cell: Cell) -> str | None:
    """A cell's exact number as the page stores it (``data-value``)."""
    return cell[1].get("data-value")


def chromium_screenshot(page: Path, tmp_path: Path) -> np.ndarray:
    """(1000, 1400, 3) RGB pixels of ``page`` rendered by headless Chromium; fails (never skips) without it."""
    binary = CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium")
    if binary is None:
        pytest.fail(f"headless Chromium is needed to check that {page.name} renders: install Debian's chromium "
                    "(`apt-get install -y chromium`); CI installs it")
    screenshot = tmp_path / "shot.png"
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={screenshot}", "--window-size=1400,1000",
               page.resolve().as_uri()]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert screenshot.is_file(), completed.stderr[-2000:]
    with Image.open(screenshot) as shot:
        pixels = np.asarray(shot.convert("RGB"))
    assert pixels.shape[:2] == (1000, 1400)
    return pixels


def near(pixels: np.ndarray, colour: tuple[int, int, int], tolerance: int) -> np.ndarray:
    """Mask of the pixels within ``tolerance`` of ``colour`` in every channel."""
    return np.all(np.abs(pixels.astype(int) - np.array(colour)) <= tolerance, axis=2)

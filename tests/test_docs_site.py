"""The documentation site as a reader sees it: ``mkdocs build --strict`` builds ``docs/``
(a broken link, an unknown anchor or a page left out of the nav fails the build), and
its home page opens in headless Debian chromium with its title, its top navigation and
a working menu. The screenshot goes to ``results/docs/home.png``."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.webdriver import Browser, missing

#: The top entries of the site's navigation, in order (mkdocs.yml's nav).
NAV = ("Home", "Guide", "Testcases", "Design", "Troubleshooting", "Case studies", "Benchmarks", "Ordering")
#: The pages under the Guide menu.
GUIDE = (
    "Install", "Your own kernel", "Options", "The cr3rig command", "Reports", "Bare metal over SSH",
    "Container matrix",
)  # fmt: skip


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    mkdocs = Path(sys.executable).parent / "mkdocs"
    assert mkdocs.is_file(), f"{mkdocs} is not installed: pip install -e '.[dev]' (scripts/setup.sh venv)"
    out = tmp_path_factory.mktemp("site")
    res = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, f"mkdocs build --strict failed:\n{res.stdout}{res.stderr}"
    assert (out / "index.html").is_file()
    return out


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    why = missing()
    if why:
        pytest.skip(why)
    with Browser(tmp_path / "chromium-profile", width=1400, height=900) as b:
        yield b


_HOME = """
const visible = el => { const r = el.getBoundingClientRect(); return r.width > 0 && r.height > 0; };
const top = [...document.querySelectorAll('.navbar .navbar-nav:not(.ms-md-auto) > li')];
return {
  title: document.title,
  h1: document.querySelector('div[role="main"] h1, .col-md-9 h1').innerText.replace(/\\s*¶$/, ''),
  brand: document.querySelector('.navbar-brand').innerText,
  nav: top.filter(visible).map(li => li.querySelector('a').innerText.trim()),
  navbar: getComputedStyle(document.querySelector('.navbar')).backgroundColor,
  links: [...document.querySelectorAll('div[role="main"] a, .col-md-9 a')].length,
  scripts: [...document.scripts].map(s => s.src).filter(s => s && !s.startsWith('file:')),
};
"""

_MENU = """
const toggle = [...document.querySelectorAll('a.dropdown-toggle')].find(a => a.innerText.trim() === 'Guide');
toggle.click();
const menu = toggle.parentElement.querySelector('.dropdown-menu');
return {
  shown: getComputedStyle(menu).display !== 'none' && menu.getBoundingClientRect().height > 0,
  items: [...menu.querySelectorAll('a.dropdown-item')].map(a => a.innerText.trim()),
};
"""


def test_home_page_renders_in_chromium(site: Path, browser: Browser) -> None:
    browser.open((site / "index.html").as_uri())
    seen = browser.js(_HOME)
    assert seen["title"] == "cr3rig", seen
    assert seen["h1"] == "cr3rig" and seen["brand"] == "cr3rig", seen
    assert tuple(seen["nav"]) == NAV, seen["nav"]
    assert seen["navbar"] not in ("", "rgba(0, 0, 0, 0)", "transparent"), f"no theme CSS: {seen}"
    assert seen["links"] >= 10, seen
    assert seen["scripts"] == [], f"the site loads scripts from elsewhere: {seen['scripts']}"
    menu = browser.js(_MENU)
    assert menu["shown"], f"the Guide menu did not open: {menu}"
    assert tuple(menu["items"]) == GUIDE, menu["items"]
    shot = browser.screenshot(REPO / "results" / "docs" / "home.png")
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 10_000
    # a page the menu links to opens with its own title
    browser.open((site / "guide" / "install.html").as_uri())
    assert browser.js("return document.title") == "Install - cr3rig"

"""The docs site builds with `mkdocs build --strict`, which fails on a broken link or anchor (mkdocs.yml's
validation settings), and the README, the front page, links only to what exists."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
# A Markdown link or image target: ](target) or ](target#anchor), up to the closing parenthesis.
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner about its successor, not a warning
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=config.parent)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    done = _build(REPO / "mkdocs.yml", site)
    assert done.returncode == 0, done.stdout + done.stderr
    return site


def _anchors(html: Path) -> set[str]:
    return set(re.findall(r'\sid="([^"]+)"', html.read_text(encoding="utf-8")))


def _page_html(site: Path, page: str) -> Path:
    """The built HTML of docs/PAGE: docs/x.md -> x/index.html, docs/index.md -> index.html."""
    stem = Path(page).with_suffix("")
    return site / "index.html" if stem.name == "index" else site / stem / "index.html"


def test_every_nav_page_is_built_with_the_repository_files_it_links_to(site):
    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]
    pages = [page for entry in nav for page in entry.values()]
    assert sorted(pages) == sorted(p.name for p in DOCS.glob("*.md")), "a page not in the nav, or a file"
    for page in pages:
        assert _page_html(site, page).is_file(), page
    # ../ links leave docs/ (right on GitHub); the hook copies their targets into the site.
    assert (site / "reports" / "train" / "curves.png").is_file()
    assert (site / "SECURITY" / "index.html").is_file()


def _config_with(tmp_path: Path, pages: dict[str, str]) -> Path:
    """A site in tmp_path with the project's validation settings and hook, holding only ``pages``."""
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    config["nav"] = [{name: name} for name in pages]
    (tmp_path / "docs").mkdir()
    for name, text in pages.items():
        (tmp_path / "docs" / name).write_text(text)
    (tmp_path / "tools").mkdir()
    shutil.copy(REPO / "tools" / "mkdocs_hooks.py", tmp_path / "tools")
    (tmp_path / "present.txt").write_text("a repository file outside docs/\n")
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    return tmp_path / "mkdocs.yml"


# Each broken link with the warning `mkdocs build --strict` fails on (one build checks them all: it lists
# every warning before it aborts).
BROKEN = {
    "[broken](other.md#no-such-heading)": "does not contain an anchor '#no-such-heading'",
    "[broken](#no-such-heading)": "no such anchor on this page",
    "[broken](missing.md)": "'missing.md', but the target is not found",
    "![broken](../absent.png)": "'absent.png', but the target is not found",
}


@pytest.mark.parametrize("broken", [False, True])
def test_strict_build_fails_on_a_broken_link_or_anchor(tmp_path, broken):
    links = " ".join(BROKEN) if broken else "[ok](other.md#a-heading) [ok](#top) [ok](../present.txt)"
    pages = {"index.md": f"# Top\n\n{links}\n", "other.md": "# Other\n\n## A heading\n\ntext\n"}
    done = _build(_config_with(tmp_path, pages), tmp_path / "site")
    if not broken:
        assert done.returncode == 0, done.stdout + done.stderr
        return
    assert done.returncode != 0
    for complaint in BROKEN.values():
        assert complaint in done.stderr


def test_readme_links_resolve(site):
    """Every relative link of the README names a file of the repository, and an anchor into a docs page names
    a heading of that page."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    targets = [t for t in LINK.findall(readme) if not re.match(r"[a-z]+:", t)]
    assert targets, "the README links to nothing"
    for target in targets:
        path, _, anchor = target.partition("#")
        assert (REPO / path).exists(), f"README links to {path}, which does not exist"
        if anchor:
            assert path.startswith("docs/") and path.endswith(".md"), target
            page = Path(path).relative_to("docs")
            assert anchor in _anchors(_page_html(site, str(page))), f"README: no heading #{anchor} in {path}"


def test_readme_is_a_front_page():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250
    text = "\n".join(lines)
    assert "make repro" in text and "make test" in text


def test_only_the_development_page_names_the_development_data_folder():
    """User-facing pages speak of data a user has (the official download, a mirror, a local copy)."""
    user_facing = [REPO / "README.md", *(p for p in DOCS.glob("*.md") if p.name != "development.md")]
    for page in user_facing:
        assert "shared/data" not in page.read_text(encoding="utf-8"), page.name

"""MkDocs hook (mkdocs.yml): serve the repository files that docs pages link to outside docs/.

A page links to ``../reports/train/curves.png`` or ``../SECURITY.md``, which is right on GitHub, where the
page sits in docs/. MkDocs sees only docs/, so this copies each such file into the site under its repository
path and drops the ``../`` from the link: the built site shows it, and a link to a file that does not exist
stays broken and fails ``mkdocs build --strict``.
"""

import re
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files, InclusionLevel
from mkdocs.structure.pages import Page

# The target of a Markdown link or image that leaves docs/ (every page sits directly in docs/).
OUTSIDE = re.compile(r"\]\(\.\./([^)#\s]+)")


def on_files(files: Files, config: MkDocsConfig) -> Files:
    docs = Path(config.docs_dir)
    repo = docs.parent
    targets = {t for page in docs.glob("*.md") for t in OUTSIDE.findall(page.read_text(encoding="utf-8"))}
    for target in sorted(targets):
        if (repo / target).is_file() and files.get_file_from_path(target) is None:
            # Not in the nav: a page such as SECURITY.md is reached by its link, not the menu.
            file = File(target, str(repo), config.site_dir, config.use_directory_urls)
            file.inclusion = InclusionLevel.NOT_IN_NAV
            files.append(file)
    return files


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    return OUTSIDE.sub(r"](\1", markdown)

"""MkDocs hook (mkdocs.yml ``hooks:``): the repository files the documentation site shows
or links to, without copies of them in docs/.

- The committed leaderboards (``leaderboards/*.md`` with their ``.png`` plots, and
  ``leaderboards/published/README.md``) become pages under ``leaderboards/``, listed in
  the "Leaderboards" menu after ``leaderboards.md`` (synthweb first).
- Relative links are read from where the page's file lies in the repository, so a link
  works the same on the site as in a checkout: one to a page of docs/ or to a committed
  leaderboard goes to that page on the site (``../../leaderboards/synthweb.md`` from
  ``docs/strategies/tldr.md`` becomes ``../leaderboards/synthweb.md``); one to any other
  file of the repository (code, configs, CSVs) becomes its text followed by the path as a
  code span, since the site does not serve the code (there is no public repository URL to
  point at). Links inside code are left alone.

Strict mode (``mkdocs build --strict``) then checks every link that remains.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.repo_files")

BOARDS = "leaderboards"
#: Which files of leaderboards/ the site shows: the pages and the plots they embed.
BOARD_SUFFIXES = (".md", ".png")
FIRST_BOARD = "synthweb.md"
MENU = "Leaderboards"

# [text](target) or ![alt](target "title"): text without nested brackets, a target
# without spaces (the docs write none), an optional title.
LINK = re.compile(
    r"(?P<bang>!?)\[(?P<text>[^\]\n]*)\]\((?P<target>[^)\s]+)(?P<title>\s+\"[^\"]*\")?\)"
)
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")


def _repo(config: Any) -> Path:
    return Path(config["config_file_path"]).resolve().parent


def _board_files(config: Any) -> list[tuple[str, Path]]:
    folder = _repo(config) / BOARDS
    found = [
        (path.relative_to(folder).as_posix(), path)
        for path in folder.rglob("*")
        if path.is_file() and path.suffix in BOARD_SUFFIXES
    ]
    return sorted(found)


def _board_pages(config: Any) -> list[str]:
    """The leaderboard pages' site paths: synthweb first, then the others, then published/."""
    pages = [rel for rel, _ in _board_files(config) if rel.endswith(".md")]
    top = sorted((p for p in pages if "/" not in p), key=lambda p: (p != FIRST_BOARD, p))
    return [f"{BOARDS}/{p}" for p in top + sorted(p for p in pages if "/" in p)]


def on_config(config: Any) -> Any:
    """Put every committed leaderboard in the "Leaderboards" menu."""
    for entry in config["nav"] or []:
        if isinstance(entry, dict) and MENU in entry:
            entry[MENU] = list(entry[MENU]) + _board_pages(config)
            return config
    log.warning("mkdocs.yml's nav has no %r section for the committed leaderboards", MENU)
    return config


def on_files(files: Files, config: Any) -> Files:
    """Serve leaderboards/*.md and *.png as if they lay in docs/leaderboards/."""
    for rel, path in _board_files(config):
        uri = f"{BOARDS}/{rel}"
        if files.get_file_from_path(uri) is not None:
            log.warning("docs/%s hides the committed %s", uri, path)
            continue
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def _site_path(target: Path, repo: Path, docs: Path, files: Files) -> str | None:
    """The site path (relative to docs_dir) that shows repository file ``target``, if any."""
    for root, prefix in ((docs, ""), (repo / BOARDS, f"{BOARDS}/")):
        if target == root or root in target.parents:
            uri = prefix + target.relative_to(root).as_posix()
            uri = uri.rstrip("/") if target.is_dir() else uri
            if files.get_file_from_path(uri) is not None:
                return uri
            if target.is_dir() and files.get_file_from_path(f"{uri}/README.md") is not None:
                return f"{uri}/README.md"
            return None
    return None


def _rewrite(match: re.Match[str], page_file: File, repo: Path, docs: Path, files: Files) -> str:
    target = match["target"]
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith(("#", "/")):
        return match[0]  # a URL, an anchor on the page, or absolute (strict mode's to judge)
    path, _, anchor = target.partition("#")
    source = Path(page_file.abs_src_path or "").resolve()
    resolved = Path(os.path.normpath(source.parent / path))
    if resolved != repo and repo not in resolved.parents:
        return match[0]  # leaves the repository: strict mode reports it
    uri = _site_path(resolved, repo, docs, files)
    if uri is not None:
        new = posixpath.relpath(uri, posixpath.dirname(page_file.src_uri))
        new += f"#{anchor}" if anchor else ""
        return f"{match['bang']}[{match['text']}]({new}{match['title'] or ''})"
    # A repository file the site does not serve: its path as a code span.
    shown = resolved.relative_to(repo).as_posix() + ("/" if resolved.is_dir() else "")
    text = match["text"]
    if text.strip("`").rstrip("/") in (shown.rstrip("/"), posixpath.basename(shown.rstrip("/"))):
        return f"`{shown}`"
    return f"{text} (`{shown}`)"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    repo, docs = _repo(config), Path(config["docs_dir"]).resolve()

    def rewrite_line(line: str) -> str:
        spans = [code.span() for code in INLINE_CODE.finditer(line)]

        def one(match: re.Match[str]) -> str:
            if any(start < match.start() < end for start, end in spans):
                return match[0]  # inside inline code
            return _rewrite(match, page.file, repo, docs, files)

        return LINK.sub(one, line)

    out, fenced = [], False
    for line in markdown.split("\n"):
        if FENCE.match(line):
            fenced = not fenced
        out.append(line if fenced or "](" not in line else rewrite_line(line))
    return "\n".join(out)

"""The page model (:class:`~selbench.leaderboard.page.Page`) as rich tables for the
terminal, as markdown, and as one self-contained HTML page."""

from __future__ import annotations

import base64
import html
import re

from rich.table import Table

from selbench.leaderboard.keys import TOTAL_FLOPS, metric_name
from selbench.leaderboard.page import EXPORT_NOTE, Cell, Page, Row

FLOPS_HEADER = metric_name(TOTAL_FLOPS)

# --- terminal -----------------------------------------------------------------------

_STYLES = {1: "green", -1: "red", 0: ""}


def render_terminal(page: Page) -> list:
    """Rich renderables: the title, a line of the settings every row shares, then one
    table per setting and budget, with the separation counts as its caption; paired
    differences that clear their interval are green (ahead of the baseline) or red
    (behind)."""
    from rich.text import Text

    out: list = [Text(page.title, style="bold")]
    if page.shared_plain:
        out.append(Text(page.shared_plain))
    for group in page.groups:
        for part in group.tables:
            heading = part.heading + (f" — {group.plain}" if page.several else "")
            table = Table(title=heading, caption=part.separation or None)
            for column in page.header:
                # squeezed by a narrow terminal, a FLOPs count wraps rather than lose digits
                table.add_column(
                    column,
                    justify="left" if column == "method" else "right",
                    overflow="fold" if column == FLOPS_HEADER else "ellipsis",
                )
            for row in part.rows:
                table.add_row(
                    *(Text(c.text, style=_STYLES[c.mark]) for c in row.cells),
                    style="dim" if row.reference else "",
                )
            out.append(table)
    if page.stability is not None:
        stability = page.stability
        table = Table(title=f"Ranking stability vs {stability.name.replace('`', '')}")
        for column in stability.header:
            table.add_column(column)
        for values in stability.rows:
            table.add_row(*values)
        out += [table, Text(stability.sentence)]
    return out


# --- markdown -----------------------------------------------------------------------


def _md_row(values: list[str]) -> str:
    return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"


def render_markdown(page: Page) -> str:
    lines = [f"# {page.title}", ""]
    if page.shared:
        lines += [f"**{page.shared}**", ""]
    for paragraph in page.intro:
        lines += [paragraph, ""]
    for group in page.groups:
        if page.several:
            lines += [f"## {group.title}", ""]
        for part in group.tables:
            lines += [f"{'###' if page.several else '##'} {part.heading}", ""]
            if part.separation:
                lines += [part.separation, ""]
            lines += [_md_row(page.header), "|" + "---|" * len(page.header)]
            for row in part.rows:
                texts = [c.text for c in row.cells]
                if row.reference:
                    texts = [f"*{t}*" for t in texts]
                lines.append(_md_row(texts))
            lines.append("")
    lines.append(page.footnote)
    if page.exports:
        exports = [f"- {line}" for line in page.exports]
        lines += ["", "## Export a row's subset", "", EXPORT_NOTE, "", *exports]
    if page.stability is not None:
        stability = page.stability
        lines += ["", f"## Ranking stability vs {stability.name}", "", stability.sentence, ""]
        lines += [_md_row(stability.header), "|" + "---|" * len(stability.header)]
        lines += [_md_row(values) for values in stability.rows]
    for caption, path in page.plots.items():
        lines += ["", f"![{caption}]({path.name})"]
    return "\n".join(lines) + "\n"


# --- HTML ---------------------------------------------------------------------------

# Sorting by column is a few lines of script, written here so the page stays one
# self-contained, offline file (no CDN). Cells sort by their data-v value, numbers as
# numbers; empty cells ("—") go last in either direction.
SORT_SCRIPT = """
document.querySelectorAll("table.sortable th").forEach(function (th) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0], col = th.cellIndex;
    var asc = th.getAttribute("data-order") !== "asc";
    table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("data-order"); });
    th.setAttribute("data-order", asc ? "asc" : "desc");
    function key(row) {
      var v = row.cells[col].getAttribute("data-v");
      if (v === null || v === "") return null;
      var n = Number(v);
      return isNaN(n) ? v : n;
    }
    Array.from(body.rows).sort(function (a, b) {
      var x = key(a), y = key(b);
      if (x === null || y === null) return (x === null) - (y === null);
      var c = x < y ? -1 : x > y ? 1 : 0;
      return asc ? c : -c;
    }).forEach(function (row) { body.appendChild(row); });
  });
});
"""

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1em}
div.scroll{overflow-x:auto}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}
td:first-child,th:first-child{text-align:left}
th{background:#f3f3f3;white-space:normal;vertical-align:bottom;max-width:11em}
ul.intro{padding-left:1.2em;color:#333}ul.intro li{margin:0.2em 0}
table.sortable th{cursor:pointer;user-select:none}
table.sortable th::after{content:" \\2195";color:#aaa}
table.sortable th[data-order=asc]::after{content:" \\25B2";color:#222}
table.sortable th[data-order=desc]::after{content:" \\25BC";color:#222}
td.up{background:#dff3df}td.down{background:#f8dede}
tr.reference td{font-style:italic;color:#555;background:#fafafa}
p.shared{font-weight:bold}p.note{color:#555;max-width:70em}
img{max-width:100%}figure{margin:1.5em 0}
"""


def _html_table(header: list[str], rows: list[Row], sortable: bool) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        tds = []
        for c in row.cells:
            value = f"{c.sort:.6g}" if isinstance(c.sort, float) else str(c.sort)
            attrs = "" if c.sort is None else f' data-v="{html.escape(value)}"'
            if c.mark:
                attrs += ' class="up"' if c.mark > 0 else ' class="down"'
            tds.append(f"<td{attrs}>{html.escape(c.text)}</td>")
        klass = ' class="reference"' if row.reference else ""
        body.append(f"<tr{klass}>{''.join(tds)}</tr>")
    table_class = ' class="sortable"' if sortable else ""
    return (
        f'<div class="scroll"><table{table_class}><thead><tr>{head}</tr></thead>\n<tbody>\n'
        + "\n".join(body)
        + "\n</tbody></table></div>"
    )


def _inline_markdown(text: str) -> str:
    """Escape ``text`` and turn its `code` spans into <code>."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))


def _html_tables(page: Page) -> list[str]:
    """Every setting's budget tables, each with its separation counts and, folded, the
    pairs that differ beyond their interval."""
    parts = []
    for group in page.groups:
        if page.several:
            parts.append(f"<h2>{_inline_markdown(group.title)}</h2>")
        for part in group.tables:
            tag = "h3" if page.several else "h2"
            parts.append(f"<{tag}>{html.escape(part.heading)}</{tag}>")
            if part.separation:
                parts.append(f"<p>{html.escape(part.separation)}</p>")
            parts.append(_html_table(page.header, part.rows, sortable=True))
            if part.separated_pairs:
                items = "".join(f"<li>{html.escape(p)}</li>" for p in part.separated_pairs)
                parts.append(
                    f"<details><summary>Pairs that differ beyond their paired 95% CI "
                    f"({len(part.separated_pairs)})</summary><ul>{items}</ul></details>"
                )
    return parts


def render_html(page: Page) -> str:
    """One self-contained page: sortable tables, and every plot inlined as base64 PNG."""
    parts = []
    if page.shared:
        parts.append(f'<p class="shared">{_inline_markdown(page.shared)}</p>')
    if page.intro:
        items = "".join(f"<li>{_inline_markdown(p)}</li>" for p in page.intro)
        parts.append(f'<ul class="intro">{items}</ul>')
    parts += _html_tables(page)
    parts.append(f'<p class="note">{_inline_markdown(page.footnote)}</p>')
    if page.exports:
        items = "".join(f"<li>{_inline_markdown(line)}</li>" for line in page.exports)
        parts.append(
            f"<details><summary>Export a row's subset ({len(page.exports)} rows)</summary>"
            f"<p>{_inline_markdown(EXPORT_NOTE)}</p><ul>{items}</ul></details>"
        )
    if page.stability is not None:
        stability = page.stability
        parts.append(
            f"<h2>Ranking stability vs {_inline_markdown(stability.name)}</h2>"
            f"<p>{_inline_markdown(stability.sentence)}</p>"
        )
        rows = [Row([Cell(v) for v in values]) for values in stability.rows]
        parts.append(_html_table(stability.header, rows, sortable=False))
    for caption, path in page.plots.items():
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(
            f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    body = "\n".join(parts)
    title = html.escape(page.title)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>{STYLE}</style></head>
<body><h1>{title}</h1>
{body}
<script>{SORT_SCRIPT}</script>
</body></html>
"""

"""The report as a document: sections of paragraphs, notes, tables and figures, and their three renderings.

`write_report` writes `{stem}.html` (self-contained: CSS inline, figures as data URIs), `{stem}.md` (+ `{stem}/*.png`)
and `{stem}.json` from the same sections, so the HTML, the Markdown and the JSON show the same numbers: every table
cell is formatted by `format_value` from the value the JSON holds (`unshown_cells` checks a written report for it).
The run report and the summary over runs (`aggregate`) are both written here.
"""

from __future__ import annotations

import base64
import html
import math
import traceback
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from safealign.io import atomic_path, atomic_write_json, atomic_write_text


# --------------------------------------------------------------------------------------------------
# The report in memory: sections of paragraphs, notes, tables and figures
# --------------------------------------------------------------------------------------------------
@dataclass
class Column:
    name: str
    style: str = "text"  # text, pct (a rate shown as %), num (3 decimals), elo (integer points), int


@dataclass
class TableBlock:
    title: str
    columns: list[Column]
    rows: list[list[Any]]


@dataclass
class FigureBlock:
    name: str  # file name in the figure folder (report/, seeds/)
    caption: str
    png: bytes
    data: Any  # the numbers drawn, for report.json


@dataclass
class Section:
    key: str
    title: str
    paragraphs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what is missing, and why
    blocks: list[TableBlock | FigureBlock] = field(default_factory=list)


def format_value(value: Any, style: str) -> str:
    """How a table cell is shown (HTML and Markdown alike); None / NaN: 'n/a'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if style == "pct":
        return f"{100 * value:.1f}%"
    if style == "num":
        return f"{value:.3f}"
    if style == "elo":
        return f"{value:.0f}"
    if style == "int":
        return str(int(value))
    if isinstance(value, bool):
        return "yes" if value else "no"
    return _visible(str(value))


def _visible(text: str) -> str:
    """Control characters (a sampled response may hold any: a carriage return, an ANSI escape) written as their
    escapes, so a report opened in a terminal or an editor shows them instead of acting on them; newline and tab stay."""
    return "".join(c if c in "\n\t" or unicodedata.category(c) != "Cc" else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def guarded_section(key: str, title: str, build: Callable[[], Section]) -> Section:
    """A section that cannot be built says why instead of stopping the whole report."""
    try:
        return build()
    except Exception as err:  # noqa: BLE001 - a report of a partial or odd run must still render
        section = Section(key, title)
        last = traceback.extract_tb(err.__traceback__)[-1]
        section.notes.append(f"This section could not be built: {type(err).__name__}: {err} "
                             f"({Path(last.filename).name}:{last.lineno}).")
        return section


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------
CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.7em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0 1.4em; font-size: .88em; }
th, td { border: 1px solid #ddd; padding: .3em .55em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; font-weight: 600; padding: .3em 0; }
.statement { background: #fff7e0; border-left: 4px solid #e0a800; padding: .7em 1em; }
.note { color: #8a4b00; } figure { margin: 1em 0; } figure img { max-width: 100%; }
figcaption { font-size: .88em; color: #555; }
"""


def _html_table(table: TableBlock) -> str:
    head = "".join(f"<th>{html.escape(c.name)}</th>" for c in table.columns)
    body = "".join(
        "<tr>" + "".join(f"<td{' class=n' if c.style != 'text' else ''}>{html.escape(format_value(v, c.style))}</td>"
                         for c, v in zip(table.columns, row)) + "</tr>"
        for row in table.rows)
    return f"<table><caption>{html.escape(table.title)}</caption><tr>{head}</tr>{body}</table>"


def render_html(title: str, sections: list[Section]) -> str:
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for section in sections:
        parts.append(f"<section id={section.key}><h2>{html.escape(section.title)}</h2>")
        for k, paragraph in enumerate(section.paragraphs):
            css = " class=statement" if section.key == "about" and k == 0 else ""
            parts.append(f"<p{css}>{html.escape(paragraph)}</p>")
        for note in section.notes:
            parts.append(f"<p class=note>Note: {html.escape(note)}</p>")
        for block in section.blocks:
            if isinstance(block, TableBlock):
                parts.append(_html_table(block))
            else:
                data = base64.b64encode(block.png).decode("ascii")
                parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(block.caption)}">'
                             f"<figcaption>{html.escape(block.caption)}</figcaption></figure>")
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, sections: list[Section], figure_dir: str) -> str:
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for k, paragraph in enumerate(section.paragraphs):
            lines += [f"> **{paragraph}**" if section.key == "about" and k == 0 else paragraph, ""]
        for note in section.notes:
            lines += [f"*Note: {note}*", ""]
        for block in section.blocks:
            if isinstance(block, TableBlock):
                lines += [f"**{_md_cell(block.title)}**", "",
                          "| " + " | ".join(_md_cell(c.name) for c in block.columns) + " |",
                          "|" + "|".join("---:" if c.style != "text" else "---" for c in block.columns) + "|"]
                lines += ["| " + " | ".join(_md_cell(format_value(v, c.style)) for c, v in zip(block.columns, row)) + " |"
                          for row in block.rows]
                lines.append("")
            else:
                lines += [f"![{_md_cell(block.caption)}]({figure_dir}/{block.name})", "", f"*{block.caption}*", ""]
    return "\n".join(lines) + "\n"


def _section_json(section: Section, figure_dir: str) -> dict[str, Any]:
    blocks = []
    for block in section.blocks:
        if isinstance(block, TableBlock):
            blocks.append({"type": "table", "title": block.title,
                           "columns": [{"name": c.name, "style": c.style} for c in block.columns], "rows": block.rows})
        else:
            blocks.append({"type": "figure", "name": block.name, "file": f"{figure_dir}/{block.name}",
                           "caption": block.caption, "data": block.data})
    return {"key": section.key, "title": section.title, "paragraphs": section.paragraphs, "notes": section.notes,
            "blocks": blocks}


def unshown_cells(report: dict[str, Any], page: str, markdown: str) -> tuple[int, list[tuple[str, str, str]]]:
    """Check a written report against its JSON: (how many numeric cells there are, the (table, column, text) of every
    cell whose formatted value is missing from the HTML page or the Markdown)."""
    numeric, missing = 0, []
    for block in (b for section in report["sections"] for b in section["blocks"] if b["type"] == "table"):
        for row in block["rows"]:
            for column, value in zip(block["columns"], row):
                shown = format_value(value, column["style"])
                numeric += column["style"] != "text" and value is not None
                if html.escape(shown) not in page or _md_cell(shown) not in markdown:
                    missing.append((block["title"], column["name"], shown))
    return numeric, missing


def write_report(root: Path, stem: str, title: str, sections: list[Section], header: dict[str, Any]) -> dict[str, Any]:
    """Write root/{stem}.html (self-contained), {stem}.md (+ root/{stem}/*.png) and {stem}.json from the same
    sections; return the JSON's content: title, `header`'s keys, every section's notes, and the sections."""
    report = {"title": title, **header, "notes": [note for s in sections for note in s.notes],
              "sections": [_section_json(s, stem) for s in sections]}
    figures = [b for s in sections for b in s.blocks if isinstance(b, FigureBlock)]
    root.mkdir(parents=True, exist_ok=True)
    with atomic_path(root / stem) as tmp:  # the figure folder is replaced whole: no stale PNGs remain
        tmp.mkdir()
        for figure in figures:
            (tmp / figure.name).write_bytes(figure.png)
    atomic_write_text(root / f"{stem}.md", render_markdown(title, sections, stem))
    atomic_write_text(root / f"{stem}.html", render_html(title, sections))
    atomic_write_json(root / f"{stem}.json", report)
    return report


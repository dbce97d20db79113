"""A small document model (headings, text, tables, figures) rendered to Markdown and to HTML."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Para:
    text: str


@dataclass(frozen=True)
class Note:
    """Something absent or worth a caveat; shown set apart."""

    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    caption: str = ""

    def __post_init__(self) -> None:
        for row in self.rows:
            if len(row) != len(self.headers):
                raise ValueError(
                    f"table {self.caption!r}: expected {len(self.headers)} cells per row, "
                    f"found {len(row)} in {row}"
                )


@dataclass(frozen=True)
class Figure:
    """A PNG: `md_path` is where the Markdown links it (relative); HTML embeds `png` inline."""

    png: bytes = field(repr=False)
    caption: str
    md_path: str


AnyBlock = Heading | Para | Note | Bullets | Table | Figure

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 70em; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #bbb; padding-bottom: .1em; margin-top: 2em; }
.table-wrap { overflow-x: auto; margin: .8em 0; }
table { border-collapse: collapse; font-size: .84em; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ccc; padding: .25em .45em; text-align: left; vertical-align: top; }
th { background: #f1f1f1; }
td.num { text-align: right; white-space: nowrap; }
td.num.split { white-space: normal; }
td.split span { white-space: nowrap; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: .3em; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: .4em .8em; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: .9em; color: #555; }
"""


def slug(text: str) -> str:
    """An HTML id / Markdown anchor from a heading."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


_NUMERIC = re.compile(r"^[−+\-]?\d|^—$")


def numeric_columns(table: Table) -> list[bool]:
    """Right-align a column when every cell is a number (or a dash); the first never is."""
    flags = []
    for i in range(len(table.headers)):
        cells = [row[i] for row in table.rows]
        flags.append(i > 0 and bool(cells) and all(_NUMERIC.match(c) for c in cells))
    return flags


_BRACKETED = re.compile(r"^(.+) (\([^()]{1,24}\))$")


def _html_cell(text: str, numeric: bool) -> str:
    """A table cell. One ending in a short bracket ('0.712 (0.690–0.730)', 'Site-local
    (site-a)') may wrap before the bracket and nowhere inside it; a number wraps nowhere else."""
    esc = html.escape
    found = _BRACKETED.match(text)
    if not found:
        return f'<td class="num">{esc(text)}</td>' if numeric else f"<td>{esc(text)}</td>"
    head = f"<span>{esc(found[1])}</span>" if numeric else esc(found[1])
    kind = "num split" if numeric else "split"
    return f'<td class="{kind}">{head} <span>{esc(found[2])}</span></td>'


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[AnyBlock]) -> str:
    """GitHub-flavoured Markdown; figures link their `md_path`."""
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Para):
            out.append(block.text)
        elif isinstance(block, Note):
            out.append(f"> **Note:** {block.text}")
        elif isinstance(block, Bullets):
            out.append("\n".join(f"- {item}" for item in block.items))
        elif isinstance(block, Table):
            lines = [f"**{block.caption}**", ""] if block.caption else []
            lines.append("| " + " | ".join(_md_cell(h) for h in block.headers) + " |")
            rule = ["--:" if right else "---" for right in numeric_columns(block)]
            lines.append("|" + "|".join(rule) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            out.append("\n".join(lines))
        elif isinstance(block, Figure):
            out.append(f"![{block.caption}]({block.md_path})\n\n*{block.caption}*")
        else:
            raise TypeError(f"unknown report block {type(block).__name__}")
    return "\n\n".join(out) + "\n"


def data_uri(png: bytes) -> str:
    """A base64 PNG data URI (the HTML report fetches nothing)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def to_html(blocks: list[AnyBlock], title: str) -> str:
    """One self-contained HTML page: inline CSS, images as data URIs, no external references."""
    esc = html.escape
    body: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(
                f'<h{block.level} id="{slug(block.text)}">{esc(block.text)}</h{block.level}>'
            )
        elif isinstance(block, Para):
            body.append(f"<p>{esc(block.text)}</p>")
        elif isinstance(block, Note):
            body.append(f'<p class="note"><strong>Note:</strong> {esc(block.text)}</p>')
        elif isinstance(block, Bullets):
            items = "".join(f"<li>{esc(item)}</li>" for item in block.items)
            body.append(f"<ul>{items}</ul>")
        elif isinstance(block, Table):
            caption = f"<caption>{esc(block.caption)}</caption>" if block.caption else ""
            head = "".join(f"<th>{esc(h)}</th>" for h in block.headers)
            numeric = numeric_columns(block)
            rows = "".join(
                "<tr>"
                + "".join(_html_cell(c, n) for n, c in zip(numeric, row, strict=True))
                + "</tr>"
                for row in block.rows
            )
            body.append(
                f'<div class="table-wrap"><table>{caption}<thead><tr>{head}</tr></thead>'
                f"<tbody>{rows}</tbody></table></div>"
            )
        elif isinstance(block, Figure):
            body.append(
                f'<figure><img alt="{esc(block.caption)}" src="{data_uri(block.png)}">'
                f"<figcaption>{esc(block.caption)}</figcaption></figure>"
            )
        else:
            raise TypeError(f"unknown report block {type(block).__name__}")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )

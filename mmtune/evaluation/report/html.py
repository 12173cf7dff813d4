"""The report's page: small HTML builders (tables with aligned numbers, badges, notes, figures) and
the page shell with its inline style sheet. Self-contained by design: no external fonts, scripts or
images, so the file opens the same from a laptop, an archive or an e-mail attachment.

Plain string building on `html.escape` rather than a template engine: the page is a dozen small
fragments, and Jinja is not a dependency of mmtune.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

# Colours of verdicts and flags: the words a reader scans for.
TONES = {"better": "good", "ok": "good", "worse": "bad", "fail": "bad", "warn": "warn", "small": "warn",
         "no clear difference": "neutral"}


@dataclass
class Section:
    """One section of the report: its anchor, title, body, and whether its data was recorded
    (`missing`: why not) or the section does not apply to this kind of run (`not_applicable`: why);
    either is shown in a note, and greyed in the table of contents."""

    id: str
    title: str
    body: str = ""
    missing: Optional[str] = None
    not_applicable: Optional[str] = None

    @property
    def absent(self) -> bool:
        return bool(self.missing or self.not_applicable)


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    """A number for a table: fixed decimals for fractions, grouped digits for counts, `–` for none."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.4g}"
    return str(value)


def signed(value: Any, digits: int = 4) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:+.{digits}f}"
    return fmt(value, digits)


def interval(low: Any, high: Any, digits: int = 4, sign: bool = False) -> str:
    if low is None and high is None:
        return "–"
    f = signed if sign else fmt
    return f"[{f(low, digits)}, {f(high, digits)}]"


def badge(text: Any) -> str:
    """A coloured label for a verdict or status (`better`, `worse`, `warn`, `fail`, `small`, ...)."""
    tone = TONES.get(str(text).lower(), "neutral")
    return f'<span class="badge {tone}">{esc(text)}</span>'


class Raw(str):
    """Cell content that is already HTML (a badge, a link): not escaped again."""


def cell(value: Any) -> str:
    return value if isinstance(value, Raw) else esc(value)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = (),
          caption: Optional[str] = None, css: str = "") -> str:
    """An HTML table; the columns in `numeric` are right-aligned in tabular figures."""
    num = set(numeric)
    head = "".join(f'<th{" class=num" if i in num else ""}>{esc(h)}</th>' for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td{" class=num" if i in num else ""}>{cell(v)}</td>' for i, v in enumerate(r))
                   + "</tr>" for r in rows)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f'<div class="scroll"><table class="{css}">{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def facts(pairs: Iterable[tuple[str, Any]]) -> str:
    """A two-column key/value list (skipping empty values)."""
    items = "".join(f"<dt>{esc(k)}</dt><dd>{cell(v)}</dd>" for k, v in pairs if v not in (None, "", [], {}))
    return f'<dl class="facts">{items}</dl>' if items else ""


def note(text: str, tone: str = "muted") -> str:
    return f'<p class="note {tone}">{esc(text)}</p>'


def figure(png_b64: str, alt: str, caption: Optional[str] = None) -> str:
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="data:image/png;base64,{png_b64}" alt="{esc(alt)}">{cap}</figure>'


def heat_table(rows: Sequence[str], columns: Sequence[str], values: Sequence[Sequence[float]],
               shares: Sequence[Sequence[float]], corner: str, digits: int) -> str:
    """A matrix whose cells are shaded by `shares` (0..1): the confusion matrix's two views."""
    head = f"<th>{esc(corner)}</th>" + "".join(f"<th class=num>{esc(c)}</th>" for c in columns)
    body = []
    for name, row, share in zip(rows, values, shares):
        tds = []
        for v, s in zip(row, share):
            s = max(0.0, min(1.0, float(s)))
            text = f"{v:.{digits}f}" if digits else f"{int(round(v))}"
            ink = "#fff" if s > 0.55 else "#1d2433"
            tds.append(f'<td class="num heat" style="background:rgba(37,99,235,{0.08 + 0.85 * s:.3f});color:{ink}">'
                       f"{text}</td>")
        body.append(f"<tr><th>{esc(name)}</th>{''.join(tds)}</tr>")
    return f'<div class="scroll"><table class="matrix"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


STYLE = """
:root{--ink:#1d2433;--muted:#5f6b7a;--line:#e3e7ee;--bg:#f6f7fb;--card:#fff;--accent:#2563eb;
--good:#137a3c;--good-bg:#e3f5e9;--bad:#b42318;--bad-bg:#fde7e4;--warn:#9a5b00;--warn-bg:#fff1d6;
--neutral:#475467;--neutral-bg:#eef1f5}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);font:15px/1.55 -apple-system,BlinkMacSystemFont,"Segoe UI",
Roboto,"Helvetica Neue",Arial,"Noto Sans",sans-serif}
main{max-width:1200px;margin:0 auto;padding:28px 28px 64px}
header.top{background:linear-gradient(135deg,#1e3a8a,#2563eb);color:#fff;border-radius:14px;padding:24px 28px;
margin-bottom:20px}
header.top h1{margin:0 0 4px;font-size:26px;letter-spacing:-.01em}
header.top .sub{opacity:.85;font-size:14px}
header.top .headline{margin-top:14px;font-size:18px;font-weight:600}
header.top .chips{margin-top:10px;display:flex;flex-wrap:wrap;gap:8px}
header.top .chip{background:rgba(255,255,255,.16);border-radius:999px;padding:3px 12px;font-size:13px}
.tiles{display:grid;grid-template-columns:repeat(auto-fit,minmax(200px,1fr));gap:12px;margin-top:16px}
.tile{background:rgba(255,255,255,.12);border:1px solid rgba(255,255,255,.22);border-radius:10px;padding:10px 14px}
.tile .name{font-size:13px;opacity:.85}
.tile .value{font-size:28px;font-weight:700;font-variant-numeric:tabular-nums;line-height:1.2}
.tile .ci{font-size:12.5px;opacity:.85;font-variant-numeric:tabular-nums}
.tile .delta{margin-top:6px;font-size:12.5px;font-weight:600;border-radius:999px;padding:1px 8px;display:inline-block}
.tile .delta.good{background:#d3f5df;color:#0b5d2c}
.tile .delta.bad{background:#fde0dc;color:#8f1c12}
.tile .delta.neutral{background:rgba(255,255,255,.85);color:#344054}
nav.toc{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:14px 20px;margin-bottom:20px}
nav.toc ol{margin:6px 0 0;padding:0;list-style:none;columns:3;column-gap:24px}
nav.toc li{padding:2px 0;break-inside:avoid}
nav.toc a{color:var(--ink);text-decoration:none}
nav.toc a:hover{color:var(--accent)}
nav.toc .dot{display:inline-block;width:8px;height:8px;border-radius:50%;margin-right:8px;background:var(--good)}
nav.toc .absent a{color:var(--muted)}
nav.toc .absent .dot{background:#c4cad4}
section{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:6px 24px 20px;margin-bottom:18px}
section h2{font-size:19px;margin:16px 0 10px;letter-spacing:-.01em}
section h3{font-size:15px;margin:18px 0 8px;color:#344054}
section.absent{padding-bottom:8px}
section.absent h2{color:var(--muted)}
.scroll{overflow-x:auto}
table{border-collapse:collapse;margin:6px 0 12px;font-size:14px;min-width:40%}
caption{text-align:left;color:var(--muted);font-size:13px;padding-bottom:4px}
th,td{padding:6px 12px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
thead th{font-weight:600;color:#344054;background:#f9fafc;border-bottom:2px solid var(--line);white-space:nowrap}
tbody tr:nth-child(even) td{background:#fbfcfe}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.matrix td.heat{min-width:56px;text-align:center}
table.matrix tbody th{background:#f9fafc;white-space:nowrap}
.badge{display:inline-block;border-radius:999px;padding:1px 10px;font-size:12.5px;font-weight:600;white-space:nowrap}
.badge.good{color:var(--good);background:var(--good-bg)}
.badge.bad{color:var(--bad);background:var(--bad-bg)}
.badge.warn{color:var(--warn);background:var(--warn-bg)}
.badge.neutral{color:var(--neutral);background:var(--neutral-bg)}
.note{margin:8px 0;font-size:14px}
.note.muted{color:var(--muted)}
.note.warn{color:var(--warn);background:var(--warn-bg);padding:8px 12px;border-radius:8px}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;margin:6px 0 10px;font-size:14px}
dl.facts dt{color:var(--muted)}
dl.facts dd{margin:0;font-variant-numeric:tabular-nums;word-break:break-word}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:4px 32px}
.cards h3{margin-top:8px}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:24px}
.side{display:flex;flex-wrap:wrap;gap:0 40px;align-items:flex-start}
.side>div{flex:0 0 auto;max-width:100%}
.side table{min-width:0}
figure{margin:8px 0 12px}
figure img{max-width:100%;height:auto;display:block;border-radius:6px}
figcaption{color:var(--muted);font-size:13px;margin-top:4px}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(160px,1fr));gap:14px}
.gallery .item{border:1px solid var(--line);border-radius:10px;overflow:hidden;background:#fff;font-size:13px}
.gallery .item img{width:100%;height:140px;object-fit:contain;background:#10131a;display:block}
.gallery .item .noimg{height:140px;display:flex;align-items:center;justify-content:center;color:var(--muted);
background:var(--neutral-bg);padding:8px;text-align:center}
.gallery .item .cap{padding:8px 10px}
.gallery .item .cap b{color:var(--bad)}
.gallery .item .cap .id{color:var(--muted);word-break:break-all;font-size:12px}
.bar{display:inline-block;height:9px;background:var(--accent);border-radius:4px;vertical-align:middle;opacity:.75}
.text{white-space:pre-wrap;word-break:break-word;max-width:460px}
td img.thumb{width:72px;height:72px;object-fit:cover;border-radius:6px}
details summary{cursor:pointer;color:var(--accent);margin:4px 0 8px}
footer{color:var(--muted);font-size:13px;text-align:center;margin-top:24px}
@media (max-width:760px){nav.toc ol{columns:1}.pair{grid-template-columns:1fr}}
"""


def page(title: str, header: str, sections: Sequence[Section], footer: str) -> str:
    """The whole document: header, table of contents (sections without data greyed), sections."""
    toc = "".join(f'<li class="{"absent" if s.absent else "present"}"><span class="dot"></span>'
                  f'<a href="#{esc(s.id)}">{esc(s.title)}</a></li>' for s in sections)
    parts = []
    for s in sections:
        body = s.body if s.body else ""
        if s.missing:
            body = note(f"Not recorded for this run: {s.missing}") + body
        elif s.not_applicable:
            body = note(f"Does not apply to this run: {s.not_applicable}") + body
        parts.append(f'<section id="{esc(s.id)}" class="{"absent" if s.absent else "present"}">'
                     f"<h2>{esc(s.title)}</h2>{body}</section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{STYLE}</style></head><body><main>{header}"
            f'<nav class="toc" aria-label="Contents"><strong>Contents</strong><ol>{toc}</ol></nav>'
            f"{''.join(parts)}<footer>{footer}</footer></main></body></html>\n")

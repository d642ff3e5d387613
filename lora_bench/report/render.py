"""The study's report: ``paper/report.md`` and a self-contained ``paper/report.html``, from tables alone.

``build_report`` reads the tidy tables (``runs``, ``metrics``) and what ``lora_bench.analysis`` derived from
them (``tests``, ``summary``, ``seed_consistency``) plus the figure files, and fills the Jinja2 template
``templates/report.md.j2``. Each section of the report is a module of ``sections/`` (its context) and a partial
under ``templates/`` (its layout); this module only reads the tables, assembles the context and writes the files
(``lora_bench.atomic.write_text``). It never recomputes statistics: a report that disagreed with the committed tables
would be worse than none, so a missing table is an error that names the command to run.

Every sentence that states a result is generated from a row of the tests table, with its interval,
test, Holm-adjusted p-value and number of seeds, and "no significant difference" is said as plainly
as a win. The reference section puts each published number (``lora_bench.report.reference``) beside ours and
says whether it lies inside our 95 % interval and whether the setting is the same at all.

Families of kind ``memory_time`` (QLoRA vs LoRA vs full: memory and time) get their own table from
``cost_summary`` and the tests table instead of an accuracy table (they usually evaluate no accuracy):
per variant the setting, memory, step time, throughput and base-weight bytes, and the memory and time
ratios to the baseline with Fieller intervals and Holm p-values, plus one generated sentence per variant
("qlora uses 0.62× the memory of lora ... and takes 1.31× the time per step"). A study without any
accuracy rows says so in its headline rather than claiming that no comparison could be tested.

The HTML is the Markdown converted with the ``markdown`` package and wrapped in
``templates/report.html.j2``; figures are embedded as base64 PNG data URIs so the file can be mailed.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import jinja2
import markdown
import pandas as pd

from lora_bench.analysis import items, tuning
from lora_bench.analysis.claims import CLAIM_COLUMNS
from lora_bench.analysis.cost import COST_SUMMARY_COLUMNS
from lora_bench.analysis.power import TARGET_POWER
from lora_bench.analysis.summary import ALPHA, BOOTSTRAP_RESAMPLES, CONFIDENCE
from lora_bench.atomic import write_text
from lora_bench.report import figures, reference
from lora_bench.report.formatting import md_text
from lora_bench.report.sections.common import relative_url
from lora_bench.report.sections.converged import converged_section
from lora_bench.report.sections.failed import failed_runs
from lora_bench.report.sections.family import family_sections
from lora_bench.report.sections.item_ranks import item_rank_rows
from lora_bench.report.sections.overview import headline, overview, setup_rows
from lora_bench.report.sections.references import reference_sections
from lora_bench.report.sections.seeds import seed_rows
from lora_bench.report.sections.trust import read_trust_tables, trust_section
from lora_bench.study import kinds_where

TEMPLATES = Path(__file__).parent / "templates"
DEFAULT_TITLE = "lora-bench: LoRA finetuning with seeds and error bars"
REQUIRED_TABLES = ("runs", "metrics", "tests", "summary", "seed_consistency")
# ``cost_summary`` (from ``stats`` too) is read when present and required only by a study with a cost-only family.
# lora_bench.analysis.items: read when present (a study whose runs kept no predictions has them empty).
ITEM_TABLES = {"item_tests": items.ITEM_TESTS_COLUMNS, "item_ranks": items.ITEM_RANKS_COLUMNS,
               "item_summary": items.ITEM_SUMMARY_COLUMNS}


def _read_tables(tables_dir: Path) -> dict[str, pd.DataFrame]:
    """Every table the report reads; a missing required one is an error naming the command that writes it."""
    tables = {}
    for name in REQUIRED_TABLES:
        path = tables_dir / f"{name}.parquet"
        if not path.exists():
            hint = (
                "python -m lora_bench collect"
                if name in ("runs", "metrics")
                else "python -m lora_bench stats"
            )
            raise FileNotFoundError(f"{path} is missing; the report reads only tables: run `{hint}` first")
        tables[name] = pd.read_parquet(path)
    tables["cost_summary"] = _table_a_kind_needs(tables_dir / "cost_summary.parquet", COST_SUMMARY_COLUMNS, tables,
                                                 lambda spec: spec.cost_only, "has a memory_time family")
    read_trust_tables(tables_dir, tables)
    path = tables_dir / "tuning.parquet"
    tables["tuning"] = pd.read_parquet(path) if path.exists() else pd.DataFrame(columns=tuning.TUNING_COLUMNS)
    for name, columns in ITEM_TABLES.items():
        path = tables_dir / f"{name}.parquet"
        tables[name] = pd.read_parquet(path) if path.exists() else pd.DataFrame(columns=columns)
    tables["claims"] = _table_a_kind_needs(tables_dir / "claims.parquet", CLAIM_COLUMNS, tables,
                                           lambda spec: spec.reference_claims,
                                           "tests reference claims (an instruct family)")
    return tables


def _table_a_kind_needs(path: Path, columns: list[str], tables: dict, needed_by, what: str) -> pd.DataFrame:
    """A table of ``stats`` that only some family kinds need (``needed_by(KindSpec)``): read it; missing, it is an
    error naming the command when the study has such a family ("the study <what>"), else empty with ``columns``."""
    if path.exists():
        return pd.read_parquet(path)
    if tables["runs"]["family_kind"].isin(kinds_where(needed_by)).any():
        raise FileNotFoundError(f"{path} is missing and the study {what}: run `python -m lora_bench stats` first")
    return pd.DataFrame(columns=columns)


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,  # a misspelt field fails loudly instead of printing nothing
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default_for_string=False),
    )


def render_markdown(
    tables: dict[str, pd.DataFrame], figures_dir: Path, out_dir: Path, meta: dict | None = None
) -> tuple[str, list[dict]]:
    """The report's Markdown and its family sections (for embedding figures), from loaded tables."""
    meta = dict(meta or {})
    runs = tables["runs"]
    figures_dir, out_dir = Path(figures_dir), Path(out_dir)
    families = family_sections(tables, figures_dir, out_dir)
    trust = trust_section(tables, figures_dir, out_dir)
    ranks_png = figures_dir / f"{figures.ITEM_RANKS_FIGURE}.png"
    context = {
        **headline(tables, families),
        "title": md_text(meta.get("title") or DEFAULT_TITLE),
        "overview": overview(runs, meta),
        "setup": setup_rows(runs, meta),
        "families": families,
        "trust": trust,
        "seed_rows": seed_rows(tables["seed_consistency"]),
        "has_items": not tables["item_tests"].empty,
        "item_ranks": item_rank_rows(tables["item_ranks"]),
        "item_ranks_figure": relative_url(ranks_png, out_dir) if ranks_png.exists() else None,
        "item_resamples": items.RANK_RESAMPLES,
        "converged": tables.get("converged"),
        "failed": failed_runs(runs),
        "references": reference_sections(tables),
        "caveats": [md_text(c) for c in reference.CAVEATS],
        "confidence": int(CONFIDENCE * 100),
        "alpha": ALPHA,
        "resamples": BOOTSTRAP_RESAMPLES,
        "power": TARGET_POWER,
    }
    # Figures of the trust section (and the item-level rank figure) are embedded like the families' own.
    ranks_figure = []
    if context["item_ranks"] and context["item_ranks_figure"]:
        ranks_figure = [{"figure": context["item_ranks_figure"], "figure_path": ranks_png}]
    return (_environment().get_template("report.md.j2").render(**context),
            families + (trust or {}).get("families", []) + ranks_figure)


def _embed_figures(body: str, families: list[dict]) -> str:
    """Swap each figure's relative path for a base64 data URI so the HTML needs no other file."""
    for family in families:
        if family["figure"]:
            encoded = base64.b64encode(Path(family["figure_path"]).read_bytes()).decode("ascii")
            body = body.replace(f'src="{family["figure"]}"', f'src="data:image/png;base64,{encoded}"')
    return body


def build_report(
    tables_dir: str | Path, figures_dir: str | Path, out_dir: str | Path, meta: dict | None = None,
    reference: dict | None = None,
) -> dict[str, Path]:
    """Write ``<out_dir>/report.md`` and a self-contained ``<out_dir>/report.html``; returns both paths.

    ``tables_dir`` holds runs, metrics, tests, summary and seed_consistency (``.parquet``);
    ``figures_dir`` the PNGs from ``lora_bench.report.figures.make_all_figures``. ``meta`` adds lines to the
    setup table (e.g. ``{"config": "config/default.yaml"}``) and may set ``title``.
    """
    tables_dir, figures_dir, out_dir = Path(tables_dir), Path(figures_dir), Path(out_dir)
    tables = _read_tables(tables_dir)
    tables["converged"] = converged_section(tables, reference)
    text, families = render_markdown(tables, figures_dir, out_dir, meta)
    body = markdown.markdown(text, extensions=["tables", "toc", "sane_lists"], output_format="html")
    page = (
        _environment()
        .get_template("report.html.j2")
        .render(
            title=(meta or {}).get("title") or DEFAULT_TITLE,
            body=_embed_figures(body, families),
        )
    )
    paths = {"markdown": out_dir / "report.md", "html": out_dir / "report.html"}
    write_text(text, paths["markdown"])
    write_text(page, paths["html"])
    return paths


def snakemake_report_caption(kind: str) -> str:
    """reStructuredText caption for a family kind's figure, for Snakemake's ``report(..., caption=...)``."""
    caption = figures.figure_caption(kind)
    escaped = re.sub(r"([*`|_\\])", r"\\\1", caption)
    details = (
        "Diamonds or lines are means over seeds; error bars and bands are 95 % bootstrap confidence "
        "intervals (none where a condition has a single run); small dots are single seeds. Failed runs are "
        "left out."
    )
    return f"**{kind.replace('_', ' ')}** — {escaped}\n\n{details}\n"

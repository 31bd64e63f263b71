"""One self-contained HTML page from runs and figures: tables of the figures that matter, images inlined.

Tables: the runs (job, path), the stage-2 comparison (every ranker run, EASQ after DPO, the two oracles: the
alignment table and, when ablation runs are given, the ablation table), DPO before/after with its gate, and
the oracle headroom. Every number is written from the metrics as read (4 decimals shown, the full value in
`data-value`) and the plotted data is embedded as JSON (`<script id="report-data">`), so a reader or a test
can check the page against the runs' metrics files.
"""
from __future__ import annotations

import html
import json
import math
from typing import Any, Dict, List, Optional, Sequence

from satrank.jobs.reporting.figures import Figure
from satrank.jobs.reporting.runs import STAGE2_JOBS, Run

STAGE2_KEYS = ("true_sat@10", "true_click@10", "true_sat@10_headroom_share", "hr@10", "ndcg@10", "click_auc",
               "sat_auc_answered")
DPO_KEYS = ("true_sat@10", "true_click@10", "hr@10", "click_auc")
HEADROOM_KEYS = ("true_sat@10_by_click", "true_sat@10", "true_sat@10_oracle_click", "true_sat@10_oracle_sat",
                 "true_sat@10_headroom_share")

STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
td.num{text-align:right;font-family:monospace}figure{display:inline-block;margin:.5em}figcaption{font-size:12px;color:#555}
h2{border-bottom:1px solid #ddd;margin-top:1.6em}"""


def _cell(value: Any, key: str) -> str:
    if isinstance(value, bool) or value is None or (isinstance(value, float) and not math.isfinite(value)):
        return '<td class="num">-</td>'
    if isinstance(value, (int, float)):
        return f'<td class="num" data-key="{html.escape(key)}" data-value="{value!r}">{value:.4f}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def table(rows: Dict[str, Dict[str, Any]], keys: Sequence[str], table_id: str) -> str:
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join(f"<tr><td>{html.escape(name)}</td>" + "".join(_cell(m.get(k), f"{name}/{k}") for k in keys) + "</tr>"
                   for name, m in rows.items())
    return f'<table id="{table_id}"><tr><th>run</th>{head}</tr>{body}</table>'


def _variant(run: Run) -> str:
    model = run.metrics.get("model") or {}
    off = [k for k in ("sid", "mlse", "mtl") if model.get(k) is False]
    return str(model.get("variant", "?")) + (f" (w/o {', '.join(off)})" if off else "")


def stage2_rows(runs: Sequence[Run]) -> Dict[str, Dict[str, Any]]:
    rows: Dict[str, Dict[str, Any]] = {}
    for r in runs:
        if r.job in STAGE2_JOBS:
            rows[f"{r.name}: {_variant(r)}"] = r.metrics
        elif r.job == "dpo" and "after" in r.metrics:
            rows[f"{r.name}: EASQ after DPO"] = r.metrics["after"]
    ref = next((r.metrics for r in runs if r.job in STAGE2_JOBS and r.metrics.get("true_sat@10_oracle_sat") is not None),
               None)
    if ref is not None:
        for o, col in (("sat", "true_p_satisfied"), ("click", "true_p_click")):
            rows[f"oracle by {col}"] = {"true_sat@10": ref.get(f"true_sat@10_oracle_{o}"),
                                        "true_click@10": ref.get(f"true_click@10_oracle_{o}")}
    return rows


def dpo_section(runs: Sequence[Run]) -> str:
    parts = []
    for r in runs:
        if r.job != "dpo" or "before" not in r.metrics:
            continue
        m = r.metrics
        gate = (f"gate: dpo_ramp {m.get('dpo_ramp')}, prequential answered-AUC {m.get('prequential_sat_auc')}, "
                f"{m.get('steps')} steps over {m.get('rows')} rows")
        parts.append(f"<h3>{html.escape(r.name)}</h3><p>{html.escape(gate)}</p>"
                     + table({"before DPO": m["before"], "after DPO": m["after"]}, DPO_KEYS, f"dpo-{r.name}"))
    return "".join(parts) or "<p>No DPO run among the inputs.</p>"


def page(title: str, runs: Sequence[Run], figures: Sequence[Figure], notes: Optional[List[str]] = None) -> str:
    run_rows = "".join(f"<tr><td>{html.escape(r.name)}</td><td>{html.escape(str(r.job))}</td>"
                       f"<td>{html.escape(str(r.path))}</td></tr>" for r in runs)
    s2 = stage2_rows(runs)
    figs_html = "".join(
        f'<figure id="{html.escape(f.key)}"><figcaption><b>{html.escape(f.title)}</b></figcaption>'
        f'<img alt="{html.escape(f.title)}" src="data:image/png;base64,{f.png_b64}">'
        f"<figcaption>{html.escape(f.caption)}</figcaption></figure>" for f in figures)
    headroom = {k: v for k, v in s2.items() if not k.startswith("oracle") and v.get("true_sat@10_oracle_sat") is not None}
    data = json.dumps({f.key: f.data for f in figures}, default=str, allow_nan=True).replace("</", "<\\/")
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f'<h2>Runs</h2><table id="runs"><tr><th>run</th><th>job</th><th>path</th></tr>{run_rows}</table>',
        "<h2>Stage 2: true satisfaction of each ranking, the ablations and the oracles</h2>",
        table(s2, STAGE2_KEYS, "stage2") if s2 else "<p>No stage-2 run among the inputs.</p>",
        "<h2>Oracle headroom</h2>",
        (table(headroom, HEADROOM_KEYS, "headroom") if headroom else
         "<p>No run with simulator truth: no oracle (real data has no true_p columns).</p>"),
        "<h2>EASQ: DPO before / after</h2>", dpo_section(runs),
        "<h2>Figures</h2>", figs_html,
        "".join(f"<p>{html.escape(n)}</p>" for n in notes or []),
        f'<script type="application/json" id="report-data">{data}</script>',
    ]
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>")

"""`satrank.jobs.check_data`: read a directory of Parquet shards through the reader on every rank and account for
every row, before any training touches it.

    torchrun --nproc_per_node=N -m satrank.jobs.check_data --data DIR [--out RUN] [--config CFG] [--set k=v ...]
        [--no-labels] [--row-filter COLUMN]

Every rank reads its share with satrank.pipeline.reader.BatchLoader (the same conversion and validation as
training); the counts of all ranks are summed: rows read / emitted / rejected (by reason, with
reader.on_bad_row=skip) / filtered / dropped, OOV hits, batches, per-rank rows (balance) and the reader's
work units per slot. Written to RUN/metrics.json and printed. A layout whose big row groups force uneven
read work (satrank.pipeline.work_units.layout_warning) is logged as one warning line saying how to
rewrite it. Bad data (reader.on_bad_row=error) exits 1 with the DataError message, which names the
file, column, row and problem; every rank reaches the same decision (one gather), so no rank is
left waiting in a collective.

With `data.items` set, the item attribute table `<data dir>/<data.items.dir>` (data dir = the parent of
--data) is read too: every item id of the data (item_id column and every history value) must have a row
(`data.items.on_missing`: error stops with file, row and id; default counts them as `items_missing`), and
impressions whose own attribute columns disagree with the table are counted per column
(`items_attr_mismatch`). A data dir without the table (and no data.items.history) is reported, not checked.

The whole config is checked first, as every job does at parse time (satrank.jobs.config_checks.check_config:
the models of stages 1, 2 and 3 build, every `<stage>_train.monitor` is a metric of its job): exit 2 with one
line naming the key.
"""
from __future__ import annotations

import sys
import time
from typing import List, Optional

from satrank.jobs.engine.cli import build_parser, parse
from satrank.jobs.engine.collectives import all_gather_objects
from satrank.jobs.engine.runtime import get_logger, init_runtime, write_json_atomic
from satrank.pipeline.errors import DataError
from satrank.pipeline.items import ItemTable, data_dir_of, summarize, table_exists
from satrank.pipeline.reader import BatchLoader, sum_stats
from satrank.pipeline.work_units import balance_report, layout_warning

logger = get_logger("check_data")


def read_all(args, cfg, rt) -> dict:
    """This rank's pass over the data: counts, or {"error": message} on bad data."""
    started = time.perf_counter()
    rows = batches = 0
    items, data_dir = None, data_dir_of(args.data)
    try:
        if cfg.data.items is not None and (cfg.data.derived_sequences or table_exists(data_dir, cfg.data.items)):
            items = ItemTable.load(data_dir, cfg.data.items, cfg.data)
        loader = BatchLoader(args.data, cfg.data, cfg.reader, rank=rt.rank, world_size=rt.world_size,
                             row_filter=args.row_filter, with_labels=not args.no_labels, items=items,
                             audit_items=items is not None)
        for batch in loader:
            rows += batch.size
            batches += 1
        stats = loader.stats()
    except DataError as exc:
        return {"error": str(exc)}
    if stats["rows_emitted"] != rows:
        return {"error": f"reader accounting: rank {rt.rank} received {rows} rows but the reader counted "
                         f"{stats['rows_emitted']} emitted"}
    units = loader.work_units()  # every rank plans the same units: rank 0's report speaks for all
    return {"stats": stats, "rows": rows, "batches": batches, "files": len(loader.files),
            "fragments": len(loader.fragments), "wall_s": time.perf_counter() - started,
            "work_units": {"plan": loader.plan, **balance_report(units)}, "warning": layout_warning(units, args.data),
            "items": None if items is None else items.describe()}


def items_line(items: dict, where: str) -> str:
    """The one line saying what the item table check found (or that there was no table to check)."""
    if items["items_table"] is None:
        return f"no item table at <data dir>/{where} (data.items.dir): item ids and attributes not checked"
    return (f"item table {items['items_table']}: {items['items_rows']} rows; {items['items_missing']} item id(s) "
            f"without a row {items['items_missing_by_column']}; attribute mismatches {items['items_attr_mismatch']}")


def run(args, cfg) -> int:
    rt = init_runtime(seed=cfg.reader.seed, debug=args.debug)
    try:
        mine = read_all(args, cfg, rt)
        everyone = all_gather_objects(mine)
        errors = sorted({p["error"] for p in everyone if "error" in p})
        if errors:
            if rt.is_main:
                for err in errors:
                    print(f"satrank check-data: error: {err}", file=sys.stderr)
            return 1
        total = sum_stats([p["stats"] for p in everyone])
        described = everyone[0]["items"]
        items = {"items_table": None} if described is None else summarize(total, described)
        wall = max(p["wall_s"] for p in everyone)
        metrics = {**total, "batches": sum(p["batches"] for p in everyone), "world_size": rt.world_size,
                   "num_workers": cfg.reader.num_workers, "files": everyone[0]["files"],
                   "fragments": everyone[0]["fragments"], "rows_per_rank": [p["rows"] for p in everyone],
                   "work_units": everyone[0]["work_units"], "layout_advice": everyone[0]["warning"],
                   "data": str(args.data), "row_filter": args.row_filter, "with_labels": not args.no_labels,
                   "wall_s": wall, "rows_per_s": total["rows_read"] / wall if wall > 0 else None, **items}
        if rt.is_main:
            if metrics["layout_advice"]:
                logger.warning("check-data: uneven layout: %s", metrics["layout_advice"])
            if args.out is not None:
                write_json_atomic(args.out / "metrics.json", metrics)
            reasons = f" {total['rows_rejected']}" if total["rows_rejected"] else ""
            print(f"check-data: {args.data}: {total['rows_read']} rows read, {total['rows_emitted']} emitted, "
                  f"{total['rows_rejected_total']} rejected{reasons}, {total['rows_filtered']} "
                  f"filtered, {total['rows_dropped']} dropped; {metrics['batches']} batches on {rt.world_size} "
                  f"rank(s) (rows per rank {metrics['rows_per_rank']}), {wall:.2f}s", flush=True)
            if cfg.data.items is not None:
                print(f"check-data: {items_line(items, cfg.data.items.dir)}", flush=True)
        return 0
    finally:
        rt.close()


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser("satrank check-data", __doc__.split("\n\n")[0], out_required=False)
    parser.add_argument("--no-labels", action="store_true", help="the shards have no label columns (candidate sets)")
    parser.add_argument("--row-filter", default=None, metavar="COLUMN",
                        help="emit only rows whose 0/1 COLUMN is 1 (e.g. questionnaire_answered); "
                             "the others count as filtered")
    args, cfg = parse(parser, argv)  # the whole config checked (satrank.jobs.config_checks)
    return run(args, cfg)


if __name__ == "__main__":
    sys.exit(main())

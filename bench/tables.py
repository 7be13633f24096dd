"""Render the measured tables of README.md and docs/*.md from bench/results/*.json.

    .venv/bin/python bench/tables.py            # rewrite every table block in place
    .venv/bin/python bench/tables.py --check    # exit 1 and name the blocks that differ (what the test checks)

A table block in a document is

    <!-- table:NAME -->
    ...generated: the table, then a line naming its result file, date, machine and source...
    <!-- /table -->

and NAME is a key of TABLES below: which result file, which rows, which columns (header + a format template
over a row). A figure changes by re-running its bench (bench/results.py writes the file) and then this script,
never by editing a document.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BLOCK = re.compile(r"(<!-- table:(?P<name>[\w.:-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.DOTALL)


class Blank(dict):
    """A row for str.format_map where a missing or null field renders its whole cell empty."""

    def __getitem__(self, key):
        value = dict.get(self, key)
        if value is None:
            raise KeyError(key)
        return value


def all_rows(figures: list[dict]) -> list[dict]:
    return [row for one in figures for row in one["rows"]]


@dataclass(frozen=True)
class Table:
    results: tuple[str, ...]  # bench/results/<result>.json, one or more (e.g. one per data set)
    columns: tuple[tuple[str, str], ...]  # (header, format template over a row; `a || b`: the first that renders)
    rows: Callable[[list[dict]], list[dict]] = all_rows  # the figures of each result -> table rows


def cell(template: str, row: dict) -> str:
    """The first alternative (`a || b`) whose fields the row has; empty when none."""
    for alternative in template.split(" || "):
        try:
            return alternative.format_map(Blank(row))
        except KeyError:
            continue
    return ""


def category(name: str) -> Callable[[list[dict]], list[dict]]:
    return lambda figures: next(c["rows"] for c in figures[0]["categories"] if c["category"] == name)


def margins(figures: list[dict]) -> list[dict]:
    """One row per data set: image AUROC and margin for each b (bench/reweighting.py writes one row per b)."""
    out = []
    for one in figures:
        row = {"data": one["category"]}
        for each in one["rows"]:
            row[f"b{each['neighbours']}_image_auroc"] = each["image_auroc"]
            row[f"b{each['neighbours']}_margin"] = each["margin"]
        out.append(row)
    return out


EVAL = (("image AUROC", "{image_auroc:.3f}"), ("pixel AUROC", "{pixel_auroc:.4f}"), ("PRO", "{pro:.4f}"))
GOOD_ONLY = (("false_alarm_rate", "{false_alarm_rate:.2f}"), ("recall", "{recall:.2f}"),
             ("recall_at_f1 (its FAR)", "{recall_at_f1:.2f} ({false_alarm_rate_at_f1:.2f})"),
             ("best recall at FAR <= 0.05", "{best_recall_far_0_05:.2f}"), ("bank", "{bank:,}"), ("build s", "{build_s}"))
SEARCH = (("option", "{option}"), ("search ms/img", "{search_ms_per_image:.1f}"), ("x exact", "{x_exact_search:.1f}"),
          ("same NN", "{same_nn:.4f}"), ("images/s", "{images_per_s:.2f}"), ("x exact", "{x_exact_images_per_s:.2f}"),
          ("image AUROC", "{image_auroc:.4f}"), ("pixel AUROC", "{pixel_auroc:.4f}"), ("PRO", "{pro:.4f}"))
MAP_VARIANTS = (("distances, mirror (default)", "distances_mirror"), ("distances, reflect", "distances_reflect"),
                ("squared, mirror", "squared_mirror"), ("squared, reflect (official)", "squared_reflect"))
REWEIGHTS = (("b = 1 (plain max)", "b1"), ("b = 3", "b3"), ("b = 9 (default)", "b9"), ("b = 27", "b27"))

STAGES = ("decode", "resize_normalise", "backbone", "pooling", "search", "reweight", "upsample", "smooth", "overlay",
          "other")


def profile_rows(figures: list[dict], labels: tuple[str, ...] = ("before", "after")) -> list[dict]:
    """One row per profile (`labels`, in the table's result order) and source: images/s and each stage's share
    (bench/profile_path.py)."""
    rows = []
    for label, one in zip(labels, figures):
        for source, result in one["sources"].items():
            rows.append({"run": label, "source": source, "images_per_second": result["images_per_second"],
                         **{stage: result["stages"].get(stage, {}).get("share", 0.0) * 100 for stage in STAGES}})
    return rows


def threshold_rows(figures: list[dict]) -> list[dict]:
    """One row per data set, training-set size and calibration method (bench/threshold_sizes.py)."""
    def flat(row: dict, threshold: dict) -> dict:
        interval = threshold.get("rate_interval")
        return {**row, **threshold, "unused": threshold["false_alarm_rate_unused_train"],
                "confidence": threshold.get("confidence", "plug-in"), "unused_mean": row.get("unused_train_mean"),
                "interval": f"{interval[0]:.3f}-{interval[1]:.3f}" if interval else None}

    return [flat(row, threshold) for one in figures for row in one["rows"]
            for threshold in row.get("thresholds") or [{**row[m], "method": m} for m in ("leave-out", "kfold") if m in row]]


# bench/backbones.py's row columns after the ones that name the configuration
BACKBONE_EVAL_COLUMNS = (
    ("image AUROC", "{image_auroc:.4f}"), ("pixel AUROC", "{pixel_auroc:.4f}"), ("PRO", "{pro:.4f}"),
    ("threshold", "{threshold:.2f}"), ("false_alarm_rate", "{false_alarm_rate:.2f}"), ("recall", "{recall:.2f}"),
    ("best recall at FAR <= 0.05", "{best_recall_at_0_05:.2f}"), ("build s", "{build_s:.0f}"),
    ("images/s", "{images_per_s:.2f}"), ("load", "{load_average_1min:.1f}"))


def eval_speed_table(result: str, this: str) -> Table:
    """bench/eval_speed.py's rows: a baseline checkout against this one (`this`: the column's name)."""
    return Table((result,), (
        ("data", "{data}"), ("baseline images/s", "{baseline_images_per_second:.2f}"),
        (this, "{this_images_per_second:.2f}"), ("ratio", "x{ratio:.2f}"),
        ("image AUROC", "{baseline_image_auroc:.4f} / {this_image_auroc:.4f}"),
        ("pixel AUROC", "{baseline_pixel_auroc:.4f} / {this_pixel_auroc:.4f}"),
        ("PRO", "{baseline_pro:.4f} / {this_pro:.4f}")))


def worker_speed_table(result: str) -> Table:
    """bench/worker_speed.py's rows: `patchcore up` of a baseline checkout against this one, and their scorers alone."""
    return Table((result,), (
        ("mode", "{mode}"), ("baseline frames/s", "{baseline_frames_per_second:.1f}"),
        ("this frames/s", "{this_frames_per_second:.1f}"), ("ratio", "x{ratio:.2f}"),
        ("latency p50 ms (baseline / this)", "{baseline_latency_ms_p50:.0f} / {this_latency_ms_p50:.0f} || -"),
        ("latency p99 ms (baseline / this)", "{baseline_latency_ms_p99:.0f} / {this_latency_ms_p99:.0f} || -"),
        ("every frame scored", "{complete} || -")))  # the scorer-alone row has neither


def int8_eval_table(result: str) -> Table:
    """bench/int8.py's end-to-end rows: `patchcore eval` of one set of banks in fp32 and in int8."""
    return Table((result,), (
        ("data", "{data}"), ("precision", "{precision}"), ("images/s", "{images_per_s:.1f}"),
        ("image AUROC", "{image_auroc:.4f}"), ("pixel AUROC", "{pixel_auroc:.4f}"), ("PRO", "{pro:.4f}"),
        ("false_alarm_rate", "{false_alarm_rate:.2f}"), ("recall", "{recall:.2f}"),
        ("best recall at FAR <= 0.05", "{best_recall_at_0_05:.2f}")), lambda figures: figures[0]["eval"])


def threshold_table(result: str) -> Table:
    """bench/threshold_sizes.py's rows: the threshold at each training-set size and calibration method."""
    return Table((result,), (
        ("set", "{set}"), ("train images", "{n_train}"), ("method", "{method}"), ("confidence", "{confidence}"),
        ("threshold", "{threshold:.2f}"), ("FAR 90 % interval (bank)", "{interval} || -"),
        ("FAR (test good)", "{false_alarm_rate:.3f}"), ("FAR (unused train)", "{unused:.3f} || -"),
        ("recall", "{recall:.3f}"), ("best recall at the rate", "{best_recall_at_rate:.3f}"),
        ("gap", "{recall_gap:+.3f}"),
        ("good-score mean: calibration / unused train / test good",
         "{good_scores_mean:.2f} / {unused_mean:.2f} / {test_good_mean:.2f} || {good_scores_mean:.2f} / - / {test_good_mean:.2f}"),
        ("tail KS p", "{tail_ks_pvalue:.2f}")), threshold_rows)


TABLES: dict[str, Table] = {
    "profile_path": Table(("profile_path-before", "profile_path-after"), (
        ("run", "{run}"), ("source", "{source}"), ("images/s", "{images_per_second:.2f}"),
        *((f"{stage} %", "{" + stage + ":.0f}") for stage in STAGES)), profile_rows),
    "profile_path-backbones": Table(("profile_path-mobilenet_v2", "profile_path-efficientnet_lite2"), (
        ("backbone", "{run}"), ("source", "{source}"), ("images/s", "{images_per_second:.2f}"),
        *((f"{stage} %", "{" + stage + ":.0f}") for stage in STAGES)),
        lambda figures: profile_rows(figures, ("mobilenet_v2", "efficientnet_lite2"))),
    "profile_path-copies": Table(("profile_path-copies-before", "profile_path-copies-after"), (
        ("run", "{run}"), ("source", "{source}"), ("images/s", "{images_per_second:.2f}"),
        *((f"{stage} %", "{" + stage + ":.0f}") for stage in STAGES)),
        lambda figures: profile_rows(figures, ("b0d3462 (before)", "after"))),
    "profile_path-views": Table(("profile_path-video-view-crop", "profile_path-video-view-auto"), (
        ("view", "{run}"), ("source", "{source}"), ("images/s", "{images_per_second:.2f}"),
        *((f"{stage} %", "{" + stage + ":.0f}") for stage in STAGES)),
        lambda figures: profile_rows(figures, tuple(next(iter(f["sources"].values()))["view"] for f in figures))),
    "eval_speed": eval_speed_table("eval_speed", "this images/s"),
    "eval_speed-int8": eval_speed_table("eval_speed-int8", "this, int8, images/s"),
    "eval_speed-685cfcb": eval_speed_table("eval_speed-685cfcb", "this images/s"),
    "eval_speed-int8-685cfcb": eval_speed_table("eval_speed-int8-685cfcb", "this, int8, images/s"),
    "vs_official": Table(("vs_official",), (
        ("set", "{set}"), ("implementation", "{implementation}"), ("backbone", "{backbone}"),
        ("images/s", "{images_per_second:.2f}"), ("this / official", "x{ratio:.2f} || -"),
        ("build s", "{build_seconds:.1f}"), ("bank", "{bank:,} || -"), ("image AUROC", "{image_auroc:.4f}"),
        ("pixel AUROC", "{pixel_auroc:.4f}"))),
    "build_time": Table(("build_time",), (
        ("data", "{data}"), ("backbone", "{backbone}"), ("images", "{images}"), ("bank", "{bank:,}"),
        ("baseline build s", "{baseline_build_seconds:.1f}"), ("this build s", "{this_build_seconds:.1f}"),
        ("ratio", "x{ratio:.2f}"),
        ("after features s (baseline / this)", "{baseline_after_features_seconds:.1f} / {this_after_features_seconds:.1f}"),
        ("same coreset", "{same_coreset}"), ("good scores, largest relative difference", "{good_scores_max_relative_difference:.1e}"))),
    "bounded": Table(("bounded",), (
        ("data", "{data}"), ("bank", "{bank:,}"), ("test images", "{images}"),
        ("flagged at the bank's threshold", "{flagged_share:.0%}"),
        ("full search images/s", "{full_images_per_second:.1f}"), ("bounded images/s", "{bounded_images_per_second:.1f}"),
        ("ratio", "x{ratio:.2f}"), ("scores equal", "{scores_equal}"),
        ("patches searched in full (before completion)", "{searched_in_full_share:.1%}"),
        ("completed patches nearer than the full search", "{completed_patches_differing} of {completed_patches:,}"),
        ("ratio with 0 / 25 / 50 / 75 / 100 % flagged", "{sweep_ratios}"))),
    "worker_speed": worker_speed_table("worker_speed"),
    "worker_speed-685cfcb": worker_speed_table("worker_speed-685cfcb"),
    "worker_speed-int8-685cfcb": worker_speed_table("worker_speed-int8-685cfcb"),
    "int8-features": Table(("int8",), (
        ("backbone", "{backbone}"), ("fp32 images/s", "{fp32_images_per_s:.1f}"),
        ("int8 images/s", "{int8_images_per_s:.1f}"), ("speed-up", "x{speedup:.2f}"),
        ("feature difference (Frobenius, relative)", "{feature_fro_rel:.3f}")),
        lambda figures: figures[0]["features"]),
    "int8-eval": int8_eval_table("int8"),
    "int8-efficientnet_lite2": int8_eval_table("int8-efficientnet_lite2"),
    "threshold_sizes": threshold_table("threshold_sizes"),
    "threshold_sizes-efficientnet_lite2": threshold_table("threshold_sizes-efficientnet_lite2"),
    "views": Table(("views",), (("data", "{data}"), ("view", "{view}"), *EVAL, ("threshold", "{threshold:.2f}"),
                             *GOOD_ONLY, ("images/s", "{images_per_s:.2f}"))),
    "views-efficientnet_lite0": Table(("views-efficientnet_lite0",), (
        ("data", "{data}"), ("backbone, view", "{view}"), *EVAL, ("threshold", "{threshold:.1f}"), *GOOD_ONLY,
        ("images/s", "{images_per_s:.1f}"))),
    "reweighting-visa_macaroni1": Table(("reweighting-visa_macaroni1",), (
        ("image score", "b = {neighbours}"), ("image AUROC", "{image_auroc:.4f}"), ("recall_at_f1", "{recall_at_f1:.3f}"),
        ("false_alarm_rate_at_f1", "{false_alarm_rate_at_f1:.3f}"),
        ("best recall at FAR <= 0.01", "{best_recall_far_0_01:.3f}"),
        ("best recall at FAR <= 0.05", "{best_recall_far_0_05:.3f}")),
        lambda figures: [row for row in all_rows(figures) if "recall_at_f1" in row]),
    "bottle-vs-official": Table(("bottle-vs-official",), (
        ("run", "{run}"), ("image AUROC", "{image_auroc:.3f}"), ("pixel AUROC", "{pixel_auroc}"),
        ("PRO", "{pro}"), ("bank build", "{bank_build_s:g} s"), ("scoring", "{scoring}"))),
    "backbones-crop": Table(("backbones-crop",), (
        ("data", "{data}"), ("backbone", "{backbone}"), ("image AUROC", "{image_auroc:.4f}"),
        ("pixel AUROC", "{pixel_auroc:.4f}"), ("PRO", "{pro:.4f}"), ("F1 (optimal)", "{f1_optimal:.3f}"),
        ("build s", "{build_s}"), ("images/s", "{images_per_s:.2f}"))),
    "backbones-eval": Table(("backbones-eval",), (
        ("data", "{data}"), ("backbone(s)", "{config}"), ("combine", "{combine}"), *BACKBONE_EVAL_COLUMNS)),
    "views-efficientnet_lite2": Table(("views-efficientnet_lite2",), (
        ("data", "{data}"), ("backbone, view", "{config}, {view}"), *BACKBONE_EVAL_COLUMNS)),
    "detail-eval": Table(("detail-eval",), (
        ("data", "{data}"), ("bank", "{config}"), ("taps", "{layers}"), ("bank size", "{bank_size}"),
        ("image AUROC", "{image_auroc:.4f}"), ("pixel AUROC", "{pixel_auroc:.4f}"), ("PRO", "{pro:.4f}"),
        ("threshold", "{threshold:.2f}"), ("false_alarm_rate", "{false_alarm_rate:.2f}"), ("recall", "{recall:.2f}"),
        ("best recall at FAR <= 0.05", "{best_recall_at_0_05:.2f}"), ("build s", "{build_s:.0f}"),
        ("images/s", "{images_per_s:.2f}"), ("load", "{load_average_1min:.1f}"))),
    "maps": Table(("maps-mvtec_bottle", "maps-visa_macaroni1"), (("data (mobilenet_v2 bank): pixel AUROC / PRO", "{data}"),
                           *((header, f"{{{key}_pixel_auroc}} / {{{key}_pro}}") for header, key in MAP_VARIANTS))),
    "reweighting-margins": Table(("reweighting-mvtec_bottle", "reweighting-visa_macaroni1"), (
        ("data", "{data}"), *((header, f"{{{key}_image_auroc:.4f}} / {{{key}_margin:+.2f}}") for header, key in REWEIGHTS)),
        margins),
    "bank_build": Table(("bank_build",), (
        ("set", "{set}"), ("points", "{points:,}"), ("steps", "{steps:,}"), ("plain loop", "{plain_loop_s:.1f} s"),
        ("its radius", "{plain_radius_s:.1f} s"), ("select_coreset loop", "{loop_s:.1f} s"), ("x plain", "x{x_plain:.2f}"),
        ("with radius", "{with_radius_s:.1f} s"), ("x plain + radius", "x{x_plain_with_radius:.2f}"),
        ("same set", "{same_set}"))),
    "scoring-mvtec_bottle": Table(("scoring",), SEARCH, category("mvtec_bottle")),
    "scoring-visa_macaroni1": Table(("scoring",), SEARCH, category("visa_macaroni1")),
    "failover": Table(("failover",), (("scenario", "{scenario}"), ("failover (SIGKILL -> cluster ok)", "{failover}"),
                                   ("frames sent", "{frames_sent}"), ("lost", "{lost}"), ("note", "{note}"))),
    "scale": Table(("scale",), (
        ("backend", "{backend}"), ("workers", "{workers}"), ("cameras", "{cameras}"), ("frames", "{frames}"),
        ("frames/s", "{frames_per_s:.0f}"), ("ingest cmds/frame", "{ingest_cmds_per_frame:.1f}"),
        ("worker+store cmds/frame", "{worker_store_cmds_per_frame:.1f}"),
        ("Redis CPU ms/frame", "{redis_cpu_ms_per_frame:.3f}"), ("p99 ms (queued)", "{p99_ms_queued:.0f}"))),
    "thousand_cameras": Table(("thousand_cameras-paced", "thousand_cameras-overload"), (
        ("backend", "{backend}"), ("cameras x frames/s", "{cameras:,} x {fps_per_camera:g}"),
        ("seconds", "{seconds:.0f}"), ("stream bound", "{maxlen}"), ("frames sent", "{frames_sent:,}"),
        ("results", "{results:,}"), ("trimmed by the bound", "{trimmed:,}"), ("still queued", "{queued_after_drain:,}"),
        ("no outcome", "{without_outcome}"), ("duplicates", "{duplicates}"), ("scored/s", "{scored_frames_per_s:.0f}"), ("p50", "{p50_ms:,.0f} ms"),
        ("p99", "{p99_ms:,.0f} ms"), ("worst camera p99 / median", "{fairness:.2f}"),
        ("Redis KB/camera", "{redis_memory_kb_per_camera:.0f}"),
        ("Redis CPU ms/camera/s", "{redis_cpu_ms_per_camera_s:.3f}"),
        ("cores: Redis / workers / store / cameras",
         "{redis_cores:.2f} / {worker_cores:.2f} / {store_cores:.2f} / {producer_cores:.2f}"),
        ("worker CPU ms/result", "{worker_cpu_ms_per_frame:.0f}"),
        ("frames batched by workers", "{frames_batched:,.0f}"))),
    "soak": Table(("soak",), (("", "{cameras}"), ("sent", "{sent:,}"), ("results", "{results:,}"),
                           ("duplicates", "{duplicates}"), ("dead-lettered", "{deadlettered:,} {deadlettered_note}"),
                           ("dropped", "{dropped}"), ("lost", "{lost}"))),
    "soak-summary": Table(("soak",), (
        ("worker / store / Redis SIGKILLs", "{kills[worker]} / {kills[store]} / {kills[redis]}"),
        ("alarms", "{alarms}"), ("duplicate alarms", "{duplicate_alarms}"), ("backlog drained", "{drain_s} s"),
        ("RSS MB: worker", "{rss_mb[worker]}"), ("store", "{rss_mb[store]}"), ("each camera", "{rss_mb[camera]}"),
        ("Redis", "{rss_mb[redis]}")), lambda figures: figures),
    "soak-faults": Table(("soak-lost-replies", "soak-cluster"), (
        ("soak", "{redis_faults}"), ("minutes", "{minutes:g}"),
        ("worker / store / Redis SIGKILLs", "{kills[worker]} / {kills[store]} / {kills[redis]}"),
        ("frames sent", "{good[sent]:,}"), ("results", "{good[results]:,}"), ("duplicates", "{good[duplicates]}"),
        ("lost", "{good[lost]}"), ("gaps", "{good[gaps]}"), ("anomalous results", "{good[anomalous]:,}"),
        ("alarms (late)", "{good[alarms]:,} ({good[late_alarms]})"), ("missing alarms", "{good[missing_alarms]}"),
        ("duplicate alarms", "{good[duplicate_alarms]}"),
        ("garbage dead-lettered", "{garbage_deadlettered:,} of {garbage_sent:,}")), lambda figures: figures),
    "demo": Table(("demo",), (
        ("command", "`{command}`"), ("camera", "{mode}"), ("worker", "{worker}"), ("search", "{search}"),
        ("UTC", "{time}"), ("frames/s", "{frames_per_s:.1f}"), ("latency p50", "{latency_p50_ms} ms || {latency_p50}"),
        ("latency p99", "{latency_p99_ms:,} ms"))),
    "worker_resources": Table(("worker_resources",), (
        ("device", "{device}"), ("bank features", "{bank_features:,}"), ("frames", "{frames}"),
        ("RSS, bank loaded", "{rss_loaded_mib:,} MiB"), ("RSS, peak while scoring", "{rss_peak_mib:,} MiB"),
        ("CPU-seconds per frame", "{cpu_s_per_frame:.3f}"))),
    "gpu_check": Table(("gpu_check",), (("backbone", "{backbone}"), ("images/s, batch 1", "{batch_1}"),
                                     ("batch 8", "{batch_8}"), ("batch 32", "{batch_32}"))),
    "sink_latency": Table(("sink_latency",), (
        ("destination", "{destination}"), ("verdicts/s", "{rate_per_s:.0f}"), ("seconds", "{seconds:.0f}"),
        ("verdicts", "{verdicts:,}"), ("received", "{received:,}"), ("duplicates", "{duplicates}"),
        ("latency p50", "{latency_p50_ms:.1f} ms"), ("latency p99", "{latency_p99_ms:.1f} ms"),
        ("max", "{latency_max_ms:.0f} ms"))),
    "delivery": Table(("delivery",), (
        ("before", "{before}"), ("us", "{before_us:.1f}"), ("now", "{after}"), ("us", "{after_us:.1f}"),
        ("now / before", "x{x_before:.2f}"))),
    "pipeline": Table(("pipeline",), (
        ("max batch", "{max_batch}"), ("worker", "{worker}"), ("frames/s", "{frames_per_s:.1f} (x{x_unpipelined:.2f}) || {frames_per_s:.1f}"),
        ("latency p50", "{latency_p50_ms:.0f} ms"), ("latency p99", "{latency_p99_ms:.0f} ms"),
        ("scorer per frame", "{scorer_ms_per_frame:.1f} ms"), ("decode", "{decode_ms:.1f} ms"))),
}


def load(result: str) -> dict:
    path = RESULTS / f"{result}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (a table names it)")
    return json.loads(path.read_text())


def provenance(record: dict) -> str:
    """One line under a table: which file, when, where, how; transcribed figures say so."""
    machine = record.get("machine") or {}
    cpu = machine.get("cpu") or {}
    load = machine.get("load") or (f"under load: load average {machine['load_average_1min']} over the last minute"
                                   if machine.get("load_average_1min") is not None else None)
    where = ", ".join(str(part) for part in (cpu.get("model"), f"{cpu['cores']} cores" if cpu.get("cores") else None,
                                              machine.get("gpu") or "no GPU", load) if part)
    origin = record.get("source") or f"commit {record.get('git_commit') or 'unknown'}"
    return (f"<sub>`bench/results/{record['name']}.json`: {record['date']}; {where}; "
            f"`{record['command']}`; {origin}.</sub>")


def render(name: str) -> str:
    """The markdown of one table block (what sits between its two marker comments)."""
    if name not in TABLES:
        raise KeyError(f"no table {name!r} in bench/tables.py (known: {', '.join(sorted(TABLES))})")
    table = TABLES[name]
    records = [load(result) for result in table.results]
    # a literal '|' inside a cell would split it: escape it
    lines = ["| " + " | ".join(header for header, _ in table.columns) + " |",
             "|" + "---|" * len(table.columns)]
    for row in table.rows([record["figures"] for record in records]):
        cells = [cell(template, row).strip().replace("|", "\\|") for _, template in table.columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(provenance(record) for record in records) + "\n"


def rendered(text: str) -> str:
    """`text` with every table block regenerated."""
    return BLOCK.sub(lambda m: m.group(1) + render(m.group("name")) + m.group(4), text)


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block differs")
    args = parser.parse_args()
    stale = []
    for path in documents():
        text = path.read_text()
        new = rendered(text)
        if new != text:
            stale.append(path.relative_to(ROOT))
            if not args.check:
                path.write_text(new)
    verb = "differ from bench/results" if args.check else "rewritten"
    print(f"{', '.join(map(str, stale))}: {verb}" if stale else "every table block is up to date")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())

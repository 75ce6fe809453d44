"""Prefect flow ``label-report``: summary tables, a review queue and an HTML report of label tables.

    python flows/label_report.py LABELS --out REPORT [--threshold 0.6]
    prefect deployment run label-report/local --params '{"params": {"labels": "BASE", "out": "REPORT"}}'

``LABELS`` is one labelling output or the base folder of ``label-videos`` (see
``rnnimg.report``), of a classifier (clips) or a segmenter (masks). The flow only orchestrates
``rnnimg.report.build_report`` (Dask, streaming: tables larger than memory are fine) and publishes
the report's small table (per label, or frames per mask area), a link to the HTML page and a
summary as artifacts. It needs no Ray.
"""

from __future__ import annotations

import argparse
import json
import sys

from flowkit import Location, artifact_key, location_link, markdown_table, transient
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rnnimg import storage
from rnnimg.report import MasksReportResult, ReportConfig, ReportResult, build_report


class ReportParams(BaseModel):
    """Parameters of one report (``rnnimg report --help`` explains the same options)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    labels: Location = Field(description="a labelling output (clips/, videos/) or a label-videos base (state.json)")
    out: Location = Field(description="the report folder: labels.parquet, videos/, review/, summary.json, index.html")
    threshold: float = Field(0.6, gt=0, le=1, description="clips scoring below this go to the review queue")
    timeline_videos: int = Field(20, ge=0, le=1000, description="videos drawn in the label or mask-area timeline (first by URI)")
    overlay_videos: int = Field(4, ge=0, le=100, description="masks: videos drawn with their masks over their frames")
    model_id: str | None = Field(None, description="with a base: the model to report (default: the latest run's)")

    def report_config(self) -> ReportConfig:
        return ReportConfig(threshold=self.threshold, timeline_videos=self.timeline_videos, overlay_videos=self.overlay_videos)


@task(name="build-report", retries=1, retry_delay_seconds=10, retry_condition_fn=transient)
def build(params: ReportParams) -> ReportResult | MasksReportResult:
    """Dask over the label tables; writes the report folder (a retry rewrites it whole)."""
    return build_report(params.labels, params.out, params.report_config(), model_id=params.model_id)


@task(name="read-report-table", retries=3, retry_delay_seconds=2, retry_condition_fn=transient)
def read_report_table(result: ReportResult | MasksReportResult) -> list[dict]:
    """The report's small table: per label (classify) or frames per mask-area bin (segment)."""
    return storage.read_table(storage.join(result.out, result.TABLE)).to_pylist()


@task(name="publish-report", retries=2, retry_delay_seconds=2)
def publish_report(params: ReportParams, result: ReportResult | MasksReportResult, rows: list[dict]) -> None:
    """Artifacts: the report's small table, the HTML page (link), its counts (markdown)."""
    key = artifact_key("report", storage.basename(params.labels))
    columns = result.TABLE_COLUMNS
    create_table_artifact([{c: r[c] for c in columns} for r in rows], key=f"{key}-{result.TABLE_KEY}",
                          description=f"{result.TABLE_DESCRIPTION} of {params.labels}")
    create_link_artifact(location_link(result.html), link_text=f"label report of {params.labels}", key=f"{key}-html",
                         description=result.PAGE_DESCRIPTION)
    markdown = "\n".join(
        [f"# label-report `{params.labels}`", "", *(f"- {line}" for line in result.headline()), "",
         markdown_table(rows, columns, result.TABLE_FORMATS)]
    )
    create_markdown_artifact(markdown, key=f"{key}-summary", description=f"Label report of {params.labels}")


@flow(name="label-report", log_prints=True)
def label_report(params: ReportParams) -> dict:
    """Summarise the label tables at ``params.labels`` into the report folder ``params.out``.

    Returns:
        The report's counts (``rnnimg.report.ReportResult.summary()``).
    """
    logger = get_run_logger()
    result = build(params)
    rows = read_report_table(result)
    publish_report(params, result, rows)
    logger.info("%s report: %s", result.task, "; ".join(result.headline()))
    return result.summary()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run the label-report flow in this process.")
    parser.add_argument("labels", help="a labelling output or a label-videos base")
    parser.add_argument("--out", required=True, help="the report folder")
    parser.add_argument("--threshold", type=float, default=0.6, help="review queue: clips scoring below this (default 0.6)")
    args = parser.parse_args()
    try:
        report_params = ReportParams(labels=args.labels, out=args.out, threshold=args.threshold)
    except ValidationError as err:
        sys.exit(f"label-report: {err}")
    print(json.dumps(label_report(report_params), indent=2, default=str))

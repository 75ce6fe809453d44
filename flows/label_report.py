"""Prefect flow ``label-report``: summary tables, a review queue and an HTML report of label tables.

    python flows/label_report.py LABELS --out REPORT [--threshold 0.6]
    prefect deployment run label-report/local --params '{"params": {"labels": "BASE", "out": "REPORT"}}'

``LABELS`` is one labelling output or the base folder of ``label-videos`` (see
``rnnimg.report``). The flow only orchestrates ``rnnimg.report.build_report`` (Dask, streaming:
tables larger than memory are fine) and publishes the per-label table, a link to the HTML page and
a summary as artifacts. It needs no Ray.
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
from rnnimg.report import LABELS_TABLE, ReportConfig, ReportResult, build_report


class ReportParams(BaseModel):
    """Parameters of one report (``rnnimg report --help`` explains the same options)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    labels: Location = Field(description="a labelling output (clips/, videos/) or a label-videos base (state.json)")
    out: Location = Field(description="the report folder: labels.parquet, videos/, review/, summary.json, index.html")
    threshold: float = Field(0.6, gt=0, le=1, description="clips scoring below this go to the review queue")
    timeline_videos: int = Field(20, ge=0, le=1000, description="videos drawn in the label timeline (first by URI)")
    model_id: str | None = Field(None, description="with a base: the model to report (default: the latest run's)")

    def report_config(self) -> ReportConfig:
        return ReportConfig(threshold=self.threshold, timeline_videos=self.timeline_videos)


@task(name="build-report", retries=1, retry_delay_seconds=10, retry_condition_fn=transient)
def build(params: ReportParams) -> ReportResult:
    """Dask over the label tables; writes the report folder (a retry rewrites it whole)."""
    return build_report(params.labels, params.out, params.report_config(), model_id=params.model_id)


@task(name="read-label-summary", retries=3, retry_delay_seconds=2, retry_condition_fn=transient)
def read_label_summary(out: str) -> list[dict]:
    return storage.read_table(storage.join(out, LABELS_TABLE)).to_pylist()


@task(name="publish-report", retries=2, retry_delay_seconds=2)
def publish_report(params: ReportParams, result: ReportResult, per_label: list[dict]) -> None:
    """Artifacts: per-label table, the HTML page (link), counts and the review queue size (markdown)."""
    key = artifact_key("report", storage.basename(params.labels))
    columns = ["label", "clips", "share", "videos", "duration_s", "mean_score", "low_confidence_clips"]
    create_table_artifact([{c: r[c] for c in columns} for r in per_label], key=f"{key}-labels",
                          description=f"Clips, videos and duration per label of {params.labels}")
    create_link_artifact(location_link(result.html), link_text=f"label report of {params.labels}", key=f"{key}-html",
                         description="Static HTML report: label distribution, score histogram, timelines, review queue")
    markdown = "\n".join(
        [
            f"# label-report `{params.labels}`",
            "",
            f"- model `{result.model_id}`, runs {', '.join(result.runs) or 'not recorded'}",
            f"- {result.videos} videos: {result.ok} ok, {result.partial} partial, {result.failed} failed; {result.clips} clips",
            f"- review queue: {result.low_confidence_clips} clips with score below {result.threshold:g} "
            f"(`{storage.join(result.out, 'review')}`)",
            f"- report `{result.html}`, built in {result.seconds:.1f} s",
            "",
            markdown_table(per_label, columns, {"share": "{:.3f}", "duration_s": "{:.1f}", "mean_score": "{:.3f}"}),
        ]
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
    per_label = read_label_summary(result.out)
    publish_report(params, result, per_label)
    logger.info("report of %d videos, %d clips (%d below %.2f) -> %s", result.videos, result.clips,
                result.low_confidence_clips, result.threshold, result.html)
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

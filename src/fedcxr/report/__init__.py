"""The study report: Markdown and self-contained HTML built from the pipeline's metrics files."""

from fedcxr.report.inputs import ReportPaths, RunContext
from fedcxr.report.render import SECTIONS, ReportResult, render_report

__all__ = ["SECTIONS", "ReportPaths", "ReportResult", "RunContext", "render_report"]

"""Run reports: per-site tables, curves and a provenance-first Markdown/HTML summary."""

from fedus.reports.report import write_report

__all__ = ["write_report"]

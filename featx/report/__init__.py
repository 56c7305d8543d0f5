"""The experiment report: `featx runs` (a leaderboard that fits the terminal, or every field as
JSON or CSV) and `featx report` (one self-contained HTML page of the logged runs)."""

from featx.report.commands import report_command, runs_command, runs_from_paths
from featx.report.page import write_report
from featx.report.table import format_runs

__all__ = ["format_runs", "report_command", "runs_command", "runs_from_paths", "write_report"]

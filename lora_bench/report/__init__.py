"""Tables -> figures -> the report (paper/report.md and .html)."""

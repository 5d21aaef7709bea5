"""From MLflow records to KD-vs-IKD tables and plots.

``collect`` (the only MLflow module here) -> tidy DataFrames -> ``tables`` (model selection,
paired tests) -> ``plots`` / ``render`` -> ``report.make_report`` (what ``ikd-sweep report`` runs).
Submodules are imported on demand so that importing the package stays cheap.
"""

__all__ = ["collect", "plots", "render", "report", "simulate", "tables"]

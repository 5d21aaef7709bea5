"""From MLflow records to KD-vs-IKD tables and plots.

``collect`` (the only MLflow module here) -> tidy DataFrames (``frames``) -> ``tables``
(selection, reported runs; ``compare`` with ``stats``: intervals, tests, power; ``knobs``: what
each swept knob does; ``status``) ->
``plots`` / ``display`` -> ``render`` -> ``report.make_report`` (what ``ikd-sweep report``
runs); ``plan`` (``ikd-sweep plan``); ``simulate`` (A/A tests). Submodules are imported on
demand so that importing the package stays cheap.
"""

__all__ = ["collect", "compare", "display", "frames", "knobs", "plan", "plots", "render",
           "report", "simulate", "stats", "status", "tables"]

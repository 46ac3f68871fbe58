"""Data-quality measures shared by the data stages (similarity, near-duplicates, scoring)."""

__all__ = ["FilterRules", "analyze", "filter_rows", "load_rules"]


def __getattr__(name: str):  # lazy, so `sftlab --help` does not import numpy and friends
    if name == "analyze":
        from sftlab.quality.analysis import analyze

        return analyze
    if name in ("FilterRules", "filter_rows", "load_rules"):
        from sftlab.quality import filtering

        return getattr(filtering, name)
    raise AttributeError(f"module 'sftlab.quality' has no attribute {name!r}")

"""The benchmarks: scripts (``python benchmarks/<name>.py``) and the accuracy study, a package run as
``python -m benchmarks.accuracy`` from the repository root."""

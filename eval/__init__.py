"""Scripted evaluation (``opsd_mm.eval``): one file per benchmark under ``benchmarks/``, shared
grading rules in ``grading.py``, the runner in ``runner.py`` and the ``opsd-mm eval`` command in
``cli.py``. Importing the package has no side effects."""

"""Evaluation: sample generation (generate.py), FVD/FID (fvd.py, features.py, frechet.py),
previews (previews.py) and the results report (report.py)."""

"""Data pipeline: sampling (generate), expert banks (build-experts), trainer datasets (prepare-data)."""

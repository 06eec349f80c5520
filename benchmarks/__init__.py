"""Benchmarks of sessionstore against raw psycopg and a hand-written SQLAlchemy baseline.

Run ``python -m benchmarks.run`` (``--quick`` for the CI-sized run); see README.md.
"""

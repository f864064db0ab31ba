"""Helpers shared by the test files; pytest collects nothing here.

- ``tiers``: which tests are end-to-end, and the guard that keeps the inner loop in-process.
"""

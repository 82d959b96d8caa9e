"""Readable reference twins of the vectorized estimators (plain Python loops), used by the tests."""

"""Fixtures for the real test bed (filled in by the test-bed work)."""

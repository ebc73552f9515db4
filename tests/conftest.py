"""Shared pytest setup. Fixtures for the real test bed live in tests/plugins/bed.py."""

pytest_plugins = ["tests.plugins.bed"]

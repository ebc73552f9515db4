"""Tests of the local test bed (kubedream_operator.devbed) and of the real components it runs."""

"""The qcow2fast test suite, grouped by area (see conftest.py for the layout)."""

"""pytest configuration: the shared helpers live in ``helpers.py``, imported by name."""

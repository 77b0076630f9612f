"""The installed version of lightning_dsd, in one place that every module can read."""

__version__ = "0.1.0"

"""The library's version (stamped into saved configs)."""

__version__ = "0.1.0.dev0"

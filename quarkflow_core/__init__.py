"""Quarkflow core library: everything that knows ML, data, storage or the database."""

__version__ = "0.1.0"

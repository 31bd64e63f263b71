"""DataError: the one exception for bad input data (files, columns, rows).

Why a type of its own: jobs catch it to print a one-line diagnosis instead of a traceback, and the
DataLoader re-raises it by type in the main process (the message is kept, so it still names the
file, the column, the row and the problem).
"""
from __future__ import annotations


class DataError(ValueError):
    """Input data is unusable; the message names the file, the column (and row) and the problem."""

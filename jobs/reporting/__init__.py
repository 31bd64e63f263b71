"""`satrank.jobs.report`'s parts: the runs it reads (runs.py), the figures (figures.py), the page (html.py)."""

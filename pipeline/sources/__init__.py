"""Converters from public datasets in their official layouts to the canonical Parquet splits (docs/data.md):
one module per source, each a command `python -m satrank.pipeline.sources.NAME --src SRC --out DIR`."""

"""Shard discovery for the reader: list the Parquet files of a split and the row groups in them.

Why: every job must agree on what "the files of a split" and "row i" mean (sorted paths, hidden and
temporary files ignored), and a bad file must be refused up front with its name, before any rank
starts reading; the row-group metadata read here is what pipeline/work_units.py plans over.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from satrank.pipeline.convert import Converter
from satrank.pipeline.errors import DataError
from satrank.pipeline.work_units import Fragment


def list_shards(uri: str) -> Tuple[pafs.FileSystem, List[str]]:
    """(filesystem, sorted *.parquet paths) under a local path or a pyarrow filesystem URI.

    Names starting with '.' or '_' (temporary files, _SUCCESS markers, _temporary/) are ignored.
    """
    uri = str(uri)
    try:
        fs, root = pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), os.path.abspath(uri))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DataError(f"{uri}: not a usable filesystem URI: {exc}") from None
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{uri}: no such file or directory")
    if info.type == pafs.FileType.File:
        return fs, [root]
    files = []
    for item in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        rel = item.path[len(root):].strip("/")
        if (item.type == pafs.FileType.File and item.base_name.endswith(".parquet")
                and not any(part.startswith((".", "_")) for part in rel.split("/"))):
            files.append(item.path)
    if not files:
        raise DataError(f"{uri}: no *.parquet files under this directory")
    return fs, sorted(files)


def open_parquet(fs: pafs.FileSystem, path: str) -> pq.ParquetFile:
    if fs.get_file_info(path).size == 0:
        raise DataError(f"{path}: empty file (0 bytes), not a Parquet file")
    try:
        return pq.ParquetFile(fs.open_input_file(path))
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file (corrupt or truncated?): {exc}") from None


def read_fragments(fs: pafs.FileSystem, files: Sequence[str], converter: Optional[Converter] = None) -> List[Fragment]:
    """Row-group fragments of all files (metadata read once); schemas checked when a converter is given."""
    fragments: List[Fragment] = []
    first_file = None
    for path in files:
        pf = open_parquet(fs, path)
        md = pf.metadata
        if md.num_rows == 0:
            raise DataError(f"{path}: the file contains no rows")
        if converter is not None:
            converter.check_schema(pf.schema_arrow, path)
            extras = converter.optional_columns(pf.schema_arrow)
            first_file = first_file or (path, extras)
            if extras != first_file[1]:
                raise DataError(f"{path}: has the optional columns {extras} but {first_file[0]} has "
                                f"{first_file[1]}; all files must agree (they become Batch ids/truth keys)")
        first = 0
        for rg in range(md.num_row_groups):
            rows = md.row_group(rg).num_rows
            if rows:
                fragments.append(Fragment(len(fragments), path, rg, first, rows))
            first += rows
    return fragments

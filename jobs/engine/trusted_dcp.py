"""The trust boundary of a checkpoint: DCP metadata read with an unpickler that can build nothing but metadata.

Why: torch.distributed.checkpoint's FileSystemReader reads `state/.metadata` with a plain `pickle.load`,
so a crafted run directory passed to `--model`, `--init`, `--satisfaction`, `--propensity` or `--resume`
would run code before any of our checks. `TrustedReader` is a FileSystemReader whose `read_metadata`
admits only the classes DCP itself writes there (its metadata dataclasses and enums, `_StorageInfo`,
`torch.Size`, dtypes, layouts, paths, plain containers); anything else is refused with a
`CheckpointTrustError` naming the file and the global it asked for, before it is constructed.
The tensor payload (`*.distcp`) is raw bytes plus `torch.load(weights_only=True)` inside DCP, which
executes no code. What a user must still trust: the numbers in a checkpoint (docs/reliability.md).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Tuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import _StorageInfo

# (module, name) pairs a DCP metadata pickle may reference; torch dtypes are admitted by type below.
_ALLOWED: frozenset = frozenset(
    [(dcp_metadata.__name__, n) for n, v in vars(dcp_metadata).items() if isinstance(v, type)]
    + [(_StorageInfo.__module__, _StorageInfo.__name__),
       ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
       ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
       ("pathlib", "PureWindowsPath"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice")])


class CheckpointTrustError(ValueError):
    """A checkpoint's metadata asked for something DCP never writes: refused before it is built."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: str) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointTrustError(f"{self._path}: refused to load: the checkpoint metadata asks for "
                                   f"{module}.{name}, which DCP metadata never contains (crafted or foreign file)")


def _unpickle_metadata(stream: Any, path: str) -> dcp_metadata.Metadata:
    """Unpickle a DCP `.metadata` stream with the restricted unpickler; a non-Metadata result is refused."""
    try:
        md = _MetadataUnpickler(stream, path).load()
    except CheckpointTrustError:
        raise
    except Exception as exc:  # truncated or not a pickle at all
        raise CheckpointTrustError(f"{path}: unreadable checkpoint metadata ({type(exc).__name__}: {exc})") from None
    if not isinstance(md, dcp_metadata.Metadata):
        raise CheckpointTrustError(f"{path}: not a DCP checkpoint metadata file (holds {type(md).__name__})")
    return md


class TrustedReader(dcp.FileSystemReader):
    """dcp.FileSystemReader whose metadata goes through the restricted unpickler (same post-processing as DCP's)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _unpickle_metadata(stream, str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_state_metadata(state_dir: str | Path) -> dcp_metadata.Metadata:
    """The verified metadata of the DCP checkpoint in `state_dir` (what `FileSystemReader.read_metadata` gave)."""
    return TrustedReader(str(state_dir)).read_metadata()


def trusted_load(state: Any, state_dir: str | Path) -> None:
    """dcp.load through `TrustedReader`: the metadata is verified (a clean CheckpointTrustError, raised before
    DCP's collectives, which would wrap it in a multi-rank traceback) before anything is read or built."""
    read_state_metadata(state_dir)
    dcp.load(state, storage_reader=TrustedReader(str(state_dir)))


def allowed_globals() -> Tuple[Tuple[str, str], ...]:
    """The admitted (module, name) pairs, for docs and tests."""
    return tuple(sorted(_ALLOWED))

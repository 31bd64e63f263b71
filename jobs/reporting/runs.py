"""The runs a report is made of: each run directory's job, final metrics (metrics.json) and history (metrics.jsonl).

A path given to the report is a run directory (it holds metrics.json or metrics.jsonl) or a folder of runs
(`make demo`'s runs/demo: every child that is a run), so one argument covers a whole demo. JSON is read as
data (never unpickled); a metrics file that is not JSON is refused with one line naming it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

STAGE2_JOBS = ("train", "evaluate")


class ReportError(ValueError):
    """A path that holds no run, or a run file that cannot be read: one line naming it."""


@dataclass
class Run:
    name: str  # the run directory's name, made unique across the report
    path: Path
    job: Optional[str]
    metrics: Dict[str, Any] = field(default_factory=dict)
    history: List[Dict[str, Any]] = field(default_factory=list)

    def events(self, kind: str) -> List[Dict[str, Any]]:
        return [e for e in self.history if e.get("event") == kind]


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path}: not a readable JSON metrics file ({exc})") from None
    if not isinstance(obj, dict):
        raise ReportError(f"{path}: holds {type(obj).__name__}, not a metrics object")
    return obj


def _read_jsonl(path: Path) -> List[Dict[str, Any]]:
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError as exc:
                raise ReportError(f"{path}, line {i + 1}: not JSON ({exc})") from None
    return out


def is_run(path: Path) -> bool:
    return (path / "metrics.json").is_file() or (path / "metrics.jsonl").is_file()


def load_run(path: Path, name: str) -> Run:
    metrics = _read_json(path / "metrics.json") if (path / "metrics.json").is_file() else {}
    history = _read_jsonl(path / "metrics.jsonl") if (path / "metrics.jsonl").is_file() else []
    return Run(name=name, path=path, job=metrics.get("job"), metrics=metrics, history=history)


def find_runs(paths: Sequence[Path]) -> List[Run]:
    """Every run under `paths` (a run itself, or its child runs), in the order given, names made unique."""
    runs: List[Run] = []
    seen: Dict[str, int] = {}
    for p in paths:
        p = Path(p)
        if not p.is_dir():
            raise ReportError(f"{p}: no such run directory")
        found = [p] if is_run(p) else sorted(c for c in p.iterdir() if c.is_dir() and is_run(c))
        if not found:
            raise ReportError(f"{p}: holds no satrank run (no metrics.json or metrics.jsonl, here or one level down)")
        for d in found:
            n = seen.get(d.name, 0)
            seen[d.name] = n + 1
            runs.append(load_run(d, d.name if n == 0 else f"{d.name}~{n + 1}"))
    return runs

"""`satrank` console script: one entry point dispatching to each stage's thin CLI.

Distributed stages are launched with torchrun (`torchrun --nproc_per_node=N -m jobs.<stage>`);
`satrank <stage>` runs the same code in one process.
"""
from __future__ import annotations

import importlib
import sys
from typing import List, Optional

COMMANDS = {
    "simulate": ("satrank.pipeline.sim.simulate", "generate the simulated short-video world (Parquet shards)"),
    "check-data": ("satrank.jobs.check_data", "read shards through the reader; report rows read/rejected"),
    "pretrain": ("satrank.jobs.pretrain", "stage 1: click model whose tables initialise the satisfaction model"),
    "propensity": ("satrank.jobs.propensity", "stage 1: rho(u,i) = P(questionnaire answered), eq. 5"),
    "satisfaction": ("satrank.jobs.satisfaction", "stage 1: IPS satisfaction model g(u,i), eq. 6"),
    "train": ("satrank.jobs.train", "stage 2: the SAQRec multi-task ranker"),
    "evaluate": ("satrank.jobs.evaluate", "offline evaluation of a ranker run"),
    "dpo": ("satrank.jobs.dpo", "stage 3: EASQ LoRA pathway + online DPO"),
    "score": ("satrank.jobs.score", "batch-score Parquet candidate sets"),
    "export": ("satrank.jobs.export", "export a checkpoint as a serving artifact"),
    "serve-check": ("satrank.jobs.serve_check", "load an artifact without project code and score candidates"),
    "demo": ("satrank.jobs.demo", "run the whole pipeline end to end on the embedded default"),
}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: satrank COMMAND [ARGS...]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<14}{text}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"satrank: unknown command {name!r}; known: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())

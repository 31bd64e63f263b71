"""satrank: a TorchRec ranking pipeline aligned with questionnaire satisfaction (SAQRec + EASQ).

The torch / fbgemm-gpu / torchrec stack is installed by `make install` (requirements/*.txt),
because torchrec's metadata pins the CUDA fbgemm-gpu wheel; this file installs our packages.
The four top-level folders install as `satrank.pipeline`, `satrank.embeddings`, `satrank.models`
and `satrank.jobs`, so no generic top-level name (`models`, `jobs`, ...) can collide with another project's.
"""
from setuptools import find_packages, setup

TOP_LEVEL = ("pipeline", "embeddings", "models", "jobs")

setup(
    name="satrank",
    version="0.1.0",
    description="Industrial short-video ranking with TorchRec, aligned to questionnaire satisfaction",
    python_requires=">=3.10",
    packages=["satrank." + p for p in find_packages(include=[f"{t}{s}" for t in TOP_LEVEL for s in ("", ".*")])],
    package_dir={f"satrank.{t}": t for t in TOP_LEVEL},
    install_requires=["pyarrow", "PyYAML", "numpy", "tqdm", "torchmetrics"],
    entry_points={"console_scripts": ["satrank=satrank.jobs.satrank:main"]},
)

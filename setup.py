"""satrank: a TorchRec ranking pipeline aligned with questionnaire satisfaction (SAQRec + EASQ).

The torch / fbgemm-gpu / torchrec stack is installed by `make install` (requirements/*.txt),
because torchrec's metadata pins the CUDA fbgemm-gpu wheel; this file installs our packages.
"""
from setuptools import find_packages, setup

setup(
    name="satrank",
    version="0.1.0",
    description="Industrial short-video ranking with TorchRec, aligned to questionnaire satisfaction",
    python_requires=">=3.10",
    packages=find_packages(include=["pipeline", "pipeline.*", "models", "models.*",
                                    "embeddings", "embeddings.*", "jobs", "jobs.*"]),
    install_requires=["pyarrow", "PyYAML", "numpy", "tqdm", "torchmetrics"],
    entry_points={"console_scripts": ["satrank=jobs.satrank:main"]},
)

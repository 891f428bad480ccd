"""Installable package for the noisy-student pseudo-labeling engine (see README.md).

One import root, ``cxr_noisy_student``, mapped onto the card's folders (``datasets/``, ``augment/``,
``loops/``, ``teacher_student/``): installed, the engine's data layer is
``cxr_noisy_student.datasets`` and never shadows or overwrites Hugging Face's ``datasets``, which
most ML environments (Kaggle's among them) ship. Inside the packages imports are relative.
``run_cycle.py`` maps the same root onto a plain checkout, so it also runs without installing.
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

IMPORT_ROOT = "cxr_noisy_student"
FOLDERS = find_packages(include=["teacher_student*", "loops*", "augment*", "datasets*"])
VERSION = re.search(r'__version__ = "([^"]+)"', (Path(__file__).parent / "teacher_student" / "__init__.py").read_text())[1]

setup(
    name="cxr-noisy-student",
    version=VERSION,
    description="Self-training (noisy-student) pseudo-labeling engine for chest radiographs",
    python_requires=">=3.10",
    packages=[f"{IMPORT_ROOT}.{name}" for name in FOLDERS],
    package_dir={f"{IMPORT_ROOT}.{name}": name.replace(".", "/") for name in FOLDERS},
    py_modules=["run_cycle"],
    package_data={f"{IMPORT_ROOT}.teacher_student": ["presets/*.yaml"]},
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "timm>=1.0",
        "ultralytics>=8.3",
        "effdet>=0.4",
        "segmentation-models-pytorch>=0.5",  # the segmenter: Unet / FPN over timm encoders
        "albumentations>=2.0",
        "pydicom>=3.0",
        "pylibjpeg>=2.0",
        "pylibjpeg-openjpeg>=2.0",  # JPEG 2000 DICOMs (MIT licensed)
        "ensemble-boxes>=1.0.9",
        "numpy",
        "pandas",
        "pillow",
        "scikit-learn",
        "pycocotools",
        "matplotlib",
        "cleanlab>=2.6",
        "tqdm",
        "threadpoolctl",
        "scipy",
        "pyyaml",
    ],
    extras_require={
        # Hugging Face datasets: tests/test_install.py installs the engine beside it and runs both
        # (building it offline with this environment's setuptools, which must build wheels itself);
        # tensorboard: the live-scalars test. Both are what Kaggle images and ML environments ship.
        "test": ["pytest>=8", "datasets>=3", "tensorboard>=2.14", "setuptools>=70.1"],
        # run.tensorboard: true writes TensorBoard scalars (tensorboard --logdir <run.out>).
        "tensorboard": ["tensorboard>=2.14"],
        # 12-bit lossy JPEG DICOMs. GPL-3 licensed, hence opt-in.
        "jpeg-lossy": ["pylibjpeg-libjpeg>=2.0"],
        # run.executor: ray -- folds as Ray tasks on a cluster or a local Ray (Apache-2.0).
        "ray": ["ray>=2.40"],
    },
    entry_points={"console_scripts": ["run-cycle=run_cycle:main"]},
)

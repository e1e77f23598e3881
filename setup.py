"""Packaging for the VehicleNet MindSpore Hub model package."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="vehiclenet",
    version="1.0.0",
    description="VehicleNet vehicle re-identification (ResNet-50 + 512-d bottleneck) for MindSpore, "
    "with sha256-verified published weights",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["vehiclenet", "vehiclenet.*"]),
    # vehiclenet/assets.json is a link to the top-level manifest; the wheel gets a copy.
    package_data={"vehiclenet": ["assets.json", "csrc/*.cc", "csrc/*.c"]},
    py_modules=["hub_conf", "mindspore_hub_conf"],
    install_requires=[
        # Pinned: from 2.9.0 on the CPU kernel for 3x3/7x7 Conv2D runs ~60x slower
        # (~8 s per 384x384 image instead of ~0.13 s); 2.8.0 is the last fast release.
        "mindspore==2.8.0",
        # MindSpore 2.8.0 is built against numpy 1.x and breaks with numpy 2.
        "numpy<2",
        "requests>=2.28",
        "urllib3>=1.26",
        "tqdm>=4.60",
        "filelock>=3.10",
        "platformdirs>=3.0",
        "Pillow>=9.0",
        # Retrieval's products run on scipy's bundled OpenBLAS (vehiclenet/blas.py): newer than
        # numpy 1.26's, so it picks a kernel for current CPUs by their features.
        "scipy>=1.9",
        "threadpoolctl>=3.5",
        # oneDNN 3 for the CPU inference kernels (vehiclenet/cpu_kernels.py), compiled on first
        # use against these headers. 2023.2.0 is the last wheel built on GNU OpenMP; the newer
        # "onednn" wheels need Intel's SYCL and OpenCL runtimes. Elsewhere MindSpore's own kernels run.
        "onednn-cpu-gomp==2023.2.0; sys_platform == 'linux' and platform_machine == 'x86_64'",
        "onednn-devel-cpu-gomp==2023.2.0; sys_platform == 'linux' and platform_machine == 'x86_64'",
    ],
    extras_require={
        "test": ["pytest>=7", "onnxruntime>=1.16", "psutil>=5.9"],
    },
    entry_points={"console_scripts": ["vehiclenet=vehiclenet.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Image Recognition",
    ],
)

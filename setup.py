"""Build janus_fast. The CUDA extension janus_fast._C is built when torch has CUDA and nvcc is
found (for sm_80 and sm_90 unless TORCH_CUDA_ARCH_LIST says otherwise); JANUS_FAST_BUILD_CUDA=0|1
forces either way. Without it the package is pure Python (reference + Triton backends)."""

import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def cuda_build_decision():
    """(build?, reason) for the CUDA extension."""
    forced = os.environ.get("JANUS_FAST_BUILD_CUDA")
    if forced == "0":
        return False, "JANUS_FAST_BUILD_CUDA=0"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return False, "torch is not installed at build time (use pip install --no-build-isolation)"
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is a CPU build")
    if CUDA_HOME is None and shutil.which("nvcc") is None:
        reasons.append("nvcc was not found")
    if forced == "1":
        if reasons:
            raise RuntimeError("JANUS_FAST_BUILD_CUDA=1 but " + "; ".join(reasons))
        return True, "JANUS_FAST_BUILD_CUDA=1"
    return not reasons, "; ".join(reasons)


def extension_kwargs():
    build, reason = cuda_build_decision()
    if not build:
        print(f"janus_fast: building without CUDA kernels ({reason}); Triton and reference backends only")
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    sources = sorted(glob.glob("csrc/**/*.cu", recursive=True) + glob.glob("csrc/**/*.cpp", recursive=True))
    ext = CUDAExtension(
        "janus_fast._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        # No -std here: torch's BuildExtension picks the standard its own headers need.
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
        py_limited_api=False,
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(
    name="janus_fast",
    version="0.1.0",
    description="Fast Triton/CUDA kernels and a drop-in Janus-Pro model",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["janus_fast", "janus_fast.*"]) + ["janus_fast.kernels"],
    package_dir={"janus_fast": "janus_fast", "janus_fast.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "pillow", "safetensors", "tokenizers"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "pytest-benchmark", "triton>=3.0", "transformers>=4.50", "tokenizers"],
        "bench": ["matplotlib"],  # benchmarks/render.py's charts
    },
    entry_points={"console_scripts": ["janus-fast=janus_fast.cli:main"]},
    **extension_kwargs(),
)

"""Build and install fastcache (distribution name ``fastcache-dit``).

    pip install torch==2.13.0            # first: the extension builds against it
    pip install -e . --no-build-isolation

``--no-build-isolation`` matters: an isolated build environment would install its own
(unpinned, possibly multi-GB CUDA) torch. ``FASTCACHE_SKIP_EXT=1`` skips the C++ build;
the package then runs its eager reference on CPU.
"""

import glob
import os

from setuptools import setup

PACKAGES = ["fastcache", "fastcache.ops", "fastcache.models", "fastcache.policies", "fastcache.kernels"]
PACKAGE_DIR = {"fastcache.kernels": "kernels"}  # ship kernels/ inside fastcache's namespace


def ext_modules():
    if os.environ.get("FASTCACHE_SKIP_EXT"):
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as e:  # pragma: no cover - setup without torch
        raise SystemExit(
            "fastcache's C++ kernels build against the installed torch: install it first "
            "(pip install torch==2.13.0), then pip install -e . --no-build-isolation. "
            f"Or set FASTCACHE_SKIP_EXT=1 to skip the extension. ({e})"
        )
    # Portable flags only: no -march=native, so a wheel built here runs on any x86-64
    # (and aarch64) CPU; vector code paths are chosen at run time in csrc/.
    cxx = ["-O3", "-fopenmp", "-std=c++17", "-DNDEBUG"]
    ext = CppExtension(
        name="fastcache._C",
        sources=sorted(glob.glob("csrc/*.cpp")),
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


exts, cmdclass = ext_modules()

setup(
    name="fastcache-dit",
    version="0.1.0",
    description="Kernel-fused, sync-free caching (TeaCache & co.) for diffusion transformers",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"fastcache.models": ["weights/*.safetensors", "weights/*.json"]},
    install_requires=["torch>=2.13,<2.14", "numpy"],
    extras_require={
        "triton": ["triton>=3.4"],
        "diffusers": ["diffusers>=0.35"],
        "test": ["pytest", "pytest-benchmark", "diffusers>=0.35", "triton>=3.4", "ninja", "pybind11",
                 "scikit-learn", "matplotlib", "pillow"],
    },
    ext_modules=exts,
    cmdclass=cmdclass,
)

"""Build and install fastcache (distribution name ``fastcache-dit``).

    pip install torch==2.13.0            # first: the extension builds against it
    pip install -e . --no-build-isolation

``--no-build-isolation`` matters: an isolated build environment would install its own
(unpinned, possibly multi-GB CUDA) torch. ``FASTCACHE_SKIP_EXT=1`` skips the C++ build;
the package then runs its eager reference on CPU.
"""

import glob
import importlib.util
import os

from setuptools import setup


def _prefer_installed_kernels():
    """The Hugging Face ``kernels`` distribution (a dependency of transformers 5) registers an
    egg_info writer, ``kernels._internals...``, that setuptools loads while building this
    package; run from the checkout, ``import kernels`` would find the checkout's kernels/
    folder (installed as fastcache.kernels) instead. fastcache/_shadow.py imports the
    installed package first (loaded by path: fastcache is not importable yet)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fastcache", "_shadow.py")
    spec = importlib.util.spec_from_file_location("_fastcache_shadow", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.prefer_installed_kernels()


_prefer_installed_kernels()

PACKAGES = [
    "fastcache",
    "fastcache.interior",
    "fastcache.families",
    "fastcache.ops",
    "fastcache.models",
    "fastcache.policies",
    "fastcache.tuning",
    "fastcache.kernels",
]
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
        ) from e
    # Portable flags only: no -march=native, so a wheel built here runs on any x86-64
    # (and aarch64) CPU; csrc/kernels_avx2.cpp and kernels_avx512.cpp set their own target
    # with a pragma and csrc/cpu_dispatch.cpp picks the variant at run time.
    # -ffp-contract=off: no silent a*b+c -> FMA, so every variant rounds like the eager
    # reference (bitwise-equal element-wise outputs and decision arithmetic).
    # -fvisibility=hidden: our inline/template code binds inside _C.so, never to another
    # library's copy of the same symbol.
    # -g0 overrides the -g of Python's default CFLAGS: debug info doubles the build time.
    # -Wno-unknown-pragmas: the at::vec headers are full of `#pragma unroll` GCC ignores.
    cxx = ["-O3", "-g0", "-fopenmp", "-std=c++20", "-DNDEBUG", "-ffp-contract=off", "-fno-math-errno",
           "-fvisibility=hidden", "-fvisibility-inlines-hidden", "-Wno-unknown-pragmas"]
    # Link order matters: every source compiled for the baseline ISA comes before the
    # per-ISA kernel files, so when the linker merges duplicate inline functions (COMDAT:
    # it keeps the first copy) it keeps a baseline copy, never an AVX-512 one that a
    # baseline caller could reach. tests/ops/test_cpp.py disassembles _C.so to check that
    # no vector-extension instruction appears outside the avx2/avx512 kernels.
    sources = sorted(glob.glob("csrc/*.cpp"), key=lambda p: ("kernels_avx" in p, p))
    ext = CppExtension(
        name="fastcache._C",
        sources=sources,
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
                 "scikit-learn", "scikit-image", "matplotlib", "pillow"],
        "bench": ["cache-dit==1.5.3", "scikit-image", "matplotlib"],
    },
    ext_modules=exts,
    cmdclass=cmdclass,
)

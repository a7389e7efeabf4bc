"""Builds ``dynamask._C``: the CPU kernels always, the CUDA kernels when wanted.

CUDA kernels are built when a GPU and nvcc are present, or when forced:

    DYNAMASK_WITH_CUDA=1   build the CUDA kernels (needs nvcc; no GPU needed, e.g. CI's compile check)
    DYNAMASK_WITH_CUDA=0   never build them (fast CPU-only iteration)
    DYNAMASK_SKIP_EXT=1    build nothing (editable install over kernels already built in place)

``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures (default 7.5 through 9.0). torch must be
importable at build time: ``pip install .`` gets it from pyproject.toml's build requirements (an
isolated build against the pinned torch); ``pip install --no-build-isolation .`` builds against the
torch already installed.
"""

import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - only hit when torch is missing at build time
    raise SystemExit(
        "dynamask needs torch at build time. `pip install .` installs it from pyproject.toml's build\n"
        "requirements; when building without isolation, install torch first:\n"
        "    pip install torch==2.14.1 torchvision==0.29.1\n"
        "    pip install --no-build-isolation .\n"
        f"({exc})"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "7.5;8.0;8.6;8.9;9.0"
# The torch releases the package is built and tested against (README, "Installing into your own
# environment"): 2.11 (the oldest, checked by scripts/check_torch_range.sh in CI) through 2.14 (the
# default, pinned in pyproject.toml's build requirements). torch 2.15.0 is not supported yet: no
# torchvision release for it has been published to test with.
SUPPORTED_TORCH = ((2, 11), (2, 14))


def _check_torch_range() -> None:
    found = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    lo, hi = SUPPORTED_TORCH
    if not lo <= found <= hi:
        raise SystemExit(
            f"dynamask supports torch {lo[0]}.{lo[1]} through {hi[0]}.{hi[1]}, but this build would compile against "
            f"torch {torch.__version__}. Install a supported torch (e.g. pip install torch==2.14.1 "
            "torchvision==0.29.1), or set DYNAMASK_ALLOW_ANY_TORCH=1 to try this one anyway."
        )


if os.environ.get("DYNAMASK_ALLOW_ANY_TORCH") != "1":
    _check_torch_range()


def _want_cuda() -> bool:
    flag = os.environ.get("DYNAMASK_WITH_CUDA")
    if flag is not None and flag.strip() != "":
        if flag.strip() not in ("0", "1"):
            raise SystemExit(f"DYNAMASK_WITH_CUDA must be 0 or 1, got {flag!r}")
        want = flag.strip() == "1"
        if want and CUDA_HOME is None:
            raise SystemExit("DYNAMASK_WITH_CUDA=1 but nvcc was not found; set CUDA_HOME=/usr/local/cuda")
        return want
    return torch.cuda.is_available() and CUDA_HOME is not None


def _cuda_wheel_includes() -> list[str]:
    """ATen's CUDA headers include cuSPARSE/cuBLAS headers, which a toolkit installed with nvcc alone
    may lack; torch's own nvidia-* wheels ship them. Only used when CUDA_HOME has no cusparse.h."""
    if CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "include", "cusparse.h")):
        return []
    try:
        import nvidia  # namespace package of the nvidia-* wheels torch depends on
    except ImportError:
        return []
    dirs: list[str] = []
    for base in getattr(nvidia, "__path__", []):
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dirs if os.path.exists(os.path.join(d, "cusparse.h"))]


def _torch_release() -> str:
    """The torch this build compiles against, without a local tag (2.14.1+cu130 -> 2.14.1)."""
    return torch.__version__.split("+")[0]


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _extensions():
    if os.environ.get("DYNAMASK_SKIP_EXT") == "1":
        # scripts/setup_env.sh builds the kernels in place (incremental, with ninja) first, then
        # installs the package in editable mode without building them a second time.
        return []
    with_cuda = _want_cuda()
    sources = _sources("csrc/*.cpp") + _sources("csrc/ops/*.cpp") + _sources("csrc/ops/cpu/*.cpp")
    define_macros = []
    include_dirs = [os.path.join(ROOT, "csrc")]
    extra = {"cxx": ["-O3"]}
    if sys.platform != "win32":
        # Lets GCC if-convert and vectorise loops with float comparisons and selects (the deformable
        # conv's sample planning, csrc/ops/cpu/deform_conv2d_kernel.cpp). It changes no result: it only
        # drops the assumption that a floating-point exception could trap, and no code here enables traps.
        extra["cxx"].append("-fno-trapping-math")
    link_args = []
    if sys.platform.startswith("linux"):
        # at::parallel_for splits work over threads only in code compiled with OpenMP: without this
        # flag its `#pragma omp parallel` is ignored and every CPU kernel runs on one thread. The
        # extension then needs libgomp.so.1, which resolves to the copy torch has already loaded
        # (one OpenMP runtime, so torch.set_num_threads governs our kernels too).
        extra["cxx"].append("-fopenmp")
        link_args.append("-fopenmp")
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
        sources += _sources("csrc/ops/cuda/*.cu")
        define_macros.append(("WITH_CUDA", None))
        include_dirs += _cuda_wheel_includes()
        # -fmad=false: no fused multiply-adds, so the arithmetic shared with the CPU kernels
        # (csrc/ops/*_common.h) rounds on the GPU exactly as it does on the CPU, where the tests run.
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-fmad=false"]
        ext = CUDAExtension
    else:
        ext = CppExtension
    print(f"dynamask: building {'CPU + CUDA' if with_cuda else 'CPU-only'} kernels ({len(sources)} files)")
    return [
        ext(
            name="dynamask._C",
            sources=sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args=extra,
            extra_link_args=link_args,
        )
    ]


def _run_time_dependencies() -> list[str]:
    """torch pinned to the release this build compiles against (the kernels load only into it; pip then
    picks the torchvision built for that torch), then pyproject.toml's [tool.dynamask] dependencies."""
    path = os.path.join(ROOT, "pyproject.toml")
    try:
        import tomllib  # Python 3.11+

        with open(path, "rb") as f:
            config = tomllib.load(f)
    except ModuleNotFoundError:  # Python 3.10: setuptools' own TOML reader
        from setuptools.config.pyprojecttoml import load_file

        config = load_file(path)
    return [f"torch=={_torch_release()}", *config["tool"]["dynamask"]["dependencies"]]


# Everything else (name, version, description, readme, licence, Python versions, extras, the `dynamask`
# command) is pyproject.toml's [project] metadata.
setup(
    install_requires=_run_time_dependencies(),
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)

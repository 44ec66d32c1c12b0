"""Compile the CUDA source of pipeline.core.fused_gpu without a GPU: a dev tool, not a test.

    python -m venv /tmp/nvrtc && /tmp/nvrtc/bin/pip install numpy cuda-python nvidia-cuda-nvrtc-cu12
    /tmp/nvrtc/bin/python benchmarks/gpu_compile_check.py [--arch sm_90] [--classes 10] [--features 784]

NVRTC (the runtime compiler CuPy uses) needs no GPU or driver: this compiles
fused_gpu.SOURCE with the options the module passes (shapes as constants, no
fast math) to PTX and to machine code for --arch (sm_90: H100/H200), with
ptxas's report of registers, spills and shared memory per kernel. It catches
syntax, type and register-spill surprises before a GPU machine is borrowed; it
does not run anything (tests/test_fused_gpu.py does, on a GPU).
"""

import argparse
import ctypes
import glob
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _preload_nvrtc():
    """cuda.bindings finds libnvrtc on the library path; the pip wheel puts it in site-packages."""
    import nvidia

    for root in nvidia.__path__:
        for lib in sorted(glob.glob(os.path.join(root, "cuda_nvrtc", "lib", "libnvrtc.so*"))):
            if "alt" not in lib and "builtins" not in lib:
                ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
                return lib
    return None


def compile_source(source, options, arch):
    """(ok, log, ptx, has_cubin) of NVRTC on `source`."""
    from cuda.bindings import nvrtc

    def check(result):
        err, *rest = result
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"nvrtc: {err}")
        return rest[0] if rest else None

    program = check(nvrtc.nvrtcCreateProgram(source.encode(), b"fused_gpu.cu", 0, [], []))
    opts = [o.encode() for o in (*options, f"--gpu-architecture={arch}", "--ptxas-options=-v")]
    err, = nvrtc.nvrtcCompileProgram(program, len(opts), opts)
    size = check(nvrtc.nvrtcGetProgramLogSize(program))
    text = b" " * size
    check(nvrtc.nvrtcGetProgramLog(program, text))
    ok = err == nvrtc.nvrtcResult.NVRTC_SUCCESS
    ptx, has_cubin = "", False
    if ok:
        ptx_size = check(nvrtc.nvrtcGetPTXSize(program))
        buf = b" " * ptx_size
        check(nvrtc.nvrtcGetPTX(program, buf))
        ptx = buf.decode(errors="replace")
        if arch.startswith("sm_"):
            has_cubin = check(nvrtc.nvrtcGetCUBINSize(program)) > 0
    nvrtc.nvrtcDestroyProgram(program)
    return ok, text.decode(errors="replace").strip("\x00 \n"), ptx, has_cubin


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90", help="sm_XY (PTX and machine code) or compute_XY (PTX only)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--features", type=int, default=784)
    args = parser.parse_args()
    from pipeline.core import fused_gpu  # imports no CuPy

    lib = _preload_nvrtc()
    from cuda.bindings import nvrtc

    err, major, minor = nvrtc.nvrtcVersion()
    print(f"NVRTC {major}.{minor} ({lib or 'from the library path'}), arch {args.arch}")
    options = fused_gpu.kernel_options(args.classes, args.features)
    print("options:", " ".join(options))
    ok, text, ptx, has_cubin = compile_source(fused_gpu.SOURCE, options, args.arch)
    if text:
        print(text)
    if not ok:
        print("FAILED to compile")
        return 1
    missing = [name for name in fused_gpu.KERNELS if f".entry {name}(" not in ptx]
    print(f"PTX {len(ptx)} characters; kernels {', '.join(fused_gpu.KERNELS)}"
          f"{'; missing: ' + ', '.join(missing) if missing else ''}; machine code: {has_cubin}")
    shared = {"sgd_per_sample": fused_gpu.per_sample_shared_bytes(args.classes, args.features),
              "sgd_minibatch": fused_gpu.minibatch_shared_bytes(args.classes, args.features)}
    for name, size in shared.items():
        print(f"{name}: dynamic shared memory {size} bytes ({size / 1024:.1f} KiB; an H100/H200 block may opt in "
              f"to 227 KiB)")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())

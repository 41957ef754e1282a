"""Which C++ errors reach Python as exceptions, and which kill the process, on this machine.

On one H200 machine (torch 2.11.0+cu130, the extension built there with /opt/gcc and nvcc 13.0)
every input error that the CUDA launcher of localattn raises (block_size 5, an rpb of the wrong
shape, a head size beyond shared memory) ended the process with a segmentation fault instead of
a ValueError, while the same checks raise cleanly on the CPU machines. On 2026-11-28 the probe
showed the CPU kernel's checks crashing too, and the extension without libstdc++ among its needed
libraries: the image's compiler (/opt/gcc/bin/g++, a wrapper passing -B with a private folder)
had linked the C++ runtime statically. setup.py now names the shared runtime (tests/test_build.py
checks it with such a wrapper); not yet run on that image. This script tells the cases apart,
each in its own process, in a few seconds:

    python tests/cuda_error_probe.py

  cpu-kernel        the CPU kernel's check (g++-compiled code), CPU tensors
  cuda-launcher     the CUDA launcher's check (nvcc-compiled code), reached with CPU tensors
                    through redispatch, so no CUDA tensor and no CUDA call is involved
  cuda-tensors      the CUDA launcher's check with CUDA tensors, as the tests call it
  postprocess       a check of unet._C (another extension, g++-compiled)
  torch             an error raised inside torch itself on CUDA tensors

and prints the toolchain and the C++ runtime libraries the process loaded. It exits non-zero
if any case did not raise its exception.
"""

import subprocess
import sys
import textwrap

PRELUDE = """
import torch
import localattn._C  # noqa: F401
FORWARD = torch.ops.localattn.local_attention2d_forward.default
def inputs(device):
    q = torch.randn(1, 4, 4, 2, 8, device=device)
    return q, q.clone(), q.clone(), torch.randn(2, 7, 7, device=device)
"""

CASES = {
    "cpu-kernel": "FORWARD(*inputs('cpu'), 5, 0.3, False)",
    "cuda-launcher": (
        "FORWARD.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA),"
        " *inputs('cpu'), 5, 0.3, False)"
    ),
    "cuda-tensors": "FORWARD(*inputs('cuda'), 5, 0.3, False)",
    "postprocess": "import unet._C; torch.ops.unet.segment(torch.zeros(1, 4, dtype=torch.bool), 1)",
    "torch": "torch.ones(2, 3, device='cuda') @ torch.ones(2, 3, device='cuda')",
}

ENVIRONMENT = """
import glob, subprocess, torch, localattn._C
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
torch.ones(1, device="cuda") if torch.cuda.is_available() else None
maps = open("/proc/self/maps").read().split()
print("loaded:", sorted({p for p in maps if "libstdc++" in p or "libgcc_s" in p}))
# A shadow stack (x86 CET) turns a mismatched unwind into a SIGSEGV: is one on, and are the
# objects marked for it?
print([l for l in open("/proc/self/status") if l.startswith("x86_Thread_features")])
for so in glob.glob("localattn/_C*.so"):
    print(so, [l.strip() for l in subprocess.run(["ldd", so], capture_output=True, text=True)
               .stdout.splitlines() if "stdc++" in l or "gcc_s" in l])
    print([l.strip() for l in subprocess.run(["readelf", "-n", so], capture_output=True, text=True)
           .stdout.splitlines() if "feature" in l.lower()])
"""


def run_case(name: str, statement: str) -> bool:
    code = PRELUDE + textwrap.dedent(f"""
        try:
            {statement}
        except (ValueError, RuntimeError, TypeError, IndexError) as error:
            print(type(error).__name__, str(error).splitlines()[0][:100])
        else:
            print("no error raised")
            raise SystemExit(1)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    outcome = result.stdout.strip() or result.stderr.strip().splitlines()[-1:]
    verdict = "raised" if result.returncode == 0 else f"EXIT {result.returncode}"
    print(f"{name:14} {verdict:9} {outcome}", flush=True)
    return result.returncode == 0


def main() -> int:
    for compiler in ("/opt/gcc/bin/g++", "g++"):
        found = subprocess.run(["sh", "-c", f"{compiler} --version 2>/dev/null | head -1"],
                               capture_output=True, text=True).stdout.strip()
        print(f"{compiler}: {found or 'not found'}")
    subprocess.run([sys.executable, "-c", ENVIRONMENT])
    results = [run_case(name, statement) for name, statement in CASES.items()]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())

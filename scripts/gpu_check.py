"""The GPU check: spend a short GPU lease in phases, each well inside one 600-second call, and write a
markdown verdict to $OUT/verdict.md (OUT defaults to ./gpu_out).

    python3 scripts/gpu_check.py --phase 1      # preflight, build for this GPU, the CUDA tests
    python3 scripts/gpu_check.py --phase 2      # the GPU benchmarks (builds first if the kernels are missing)
    python3 scripts/gpu_check.py --phase all    # both, when one call has the time
    python3 scripts/gpu_check.py --dry-run      # on a CPU: the structure, the preflight, a verdict skeleton

Each step gets a share of the phase's budget (--budget, default 540 s) and a timeout, so a hung step
still leaves a verdict. Test deps missing on the GPU machine (no network there) travel as wheels under
.whl/ and are installed to /tmp/site first (see README, "GPU check").
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
WHEEL_SITE = "/tmp/site"
IMPORTS = ["torch", "torchvision", "pycocotools", "PIL", "expecttest", "hypothesis", "numpy", "pytest"]
# (name, command after the interpreter, output file, seconds at most); quick sizes, ratios vs torchvision
BENCHMARKS = [
    ("RoIAlign", ["benchmarks/roi_align.py", "--device", "cuda", "--reps", "5"], "roi_align_cuda.md", 60),
    ("deform conv", ["benchmarks/deform_conv.py", "--device", "cuda", "--quick", "--no-memory"],
     "deform_conv_cuda.md", 90),
    ("paste", ["benchmarks/paste.py", "--device", "cuda", "--reps", "5"], "paste_cuda.md", 60),
    ("mask head", ["benchmarks/mask_head.py", "--device", "cuda", "--repeats", "5"], "mask_head_cuda.md", 60),
    ("end to end", ["benchmarks/e2e.py", "--device", "cuda", "--images", "2", "--reps", "5"], "e2e_cuda.md", 150),
]


class Check:
    """Runs the steps against a deadline and collects the verdict's lines."""

    def __init__(self, out: str, budget: float, dry_run: bool) -> None:
        self.out, self.dry_run = out, dry_run
        self.start = time.monotonic()
        self.deadline = self.start + budget
        self.lines: list[str] = []
        self.ok = True
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, self.env.get("PYTHONPATH")) if p)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def say(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def fail(self, line: str) -> None:
        self.ok = False
        self.say(f"- **FAIL** {line}")

    def run(self, cmd: list[str], limit: float, log: str | None = None) -> tuple[int, str, float]:
        """(exit status, output, seconds); 124 when it ran past min(limit, what the budget leaves)."""
        limit = max(1.0, min(limit, self.left() - 15))
        t0 = time.monotonic()
        try:
            p = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=limit)
            rc, text = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            rc = 124
            text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            text += f"\n[timed out after {limit:.0f} s]"
        if log:
            with open(os.path.join(self.out, log), "a") as f:
                f.write(f"$ {' '.join(cmd)}\n{text}\n")
        return rc, text, time.monotonic() - t0

    def write(self, title: str) -> None:
        took = time.monotonic() - self.start
        head = [f"# GPU check: {title}", "", f"Verdict: **{'PASS' if self.ok else 'FAIL'}**"
                + (" (dry run: GPU steps stubbed)" if self.dry_run else "") + f"; {took:.0f} s.", ""]
        with open(os.path.join(self.out, "verdict.md"), "w") as f:
            f.write("\n".join(head + self.lines) + "\n")
        print(f"\nverdict written to {os.path.join(self.out, 'verdict.md')} ({took:.0f} s)")


# ------------------------------------------------------------------------------------------ phase 1


def install_wheels(c: Check) -> None:
    wheels = sorted(glob.glob(os.path.join(ROOT, ".whl", "*.whl")))
    if not wheels:
        c.say("- wheels: no .whl/ folder, nothing to install")
        return
    cmd = [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", WHEEL_SITE, *wheels]
    if c.dry_run:
        c.say(f"- wheels: would install {len(wheels)} from .whl/ to {WHEEL_SITE} (dry run)")
        return
    rc, text, _ = c.run(cmd, 120)
    if rc:
        c.fail(f"installing .whl/*.whl: {text.strip().splitlines()[-1:]}")
        return
    sys.path.insert(0, WHEEL_SITE)
    c.env["PYTHONPATH"] = os.pathsep.join([WHEEL_SITE, c.env["PYTHONPATH"]])
    c.say(f"- wheels: installed {', '.join(os.path.basename(w).split('-')[0] for w in wheels)}")


def preflight(c: Check) -> dict:
    """Versions, nvcc against torch's CUDA (a major mismatch stops the run), ninja, the test imports and one
    CUDA call through torchvision. Returns facts the later steps use."""
    import torch

    c.say("## Preflight")
    c.say(f"- python {sys.version.split()[0]}, torch {torch.__version__}, torch CUDA {torch.version.cuda}")
    facts: dict = {"cuda": torch.cuda.is_available()}
    nvcc = shutil.which("nvcc") or (os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"))
    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
        m = re.search(r"release (\d+)\.(\d+)", text)
        nvcc_ver = f"{m.group(1)}.{m.group(2)}" if m else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        nvcc_ver = None
    c.say(f"- nvcc: {nvcc_ver or 'not found'} (torch built with CUDA {torch.version.cuda})")
    if nvcc_ver and torch.version.cuda and nvcc_ver.split(".")[0] != torch.version.cuda.split(".")[0]:
        c.fail(f"nvcc {nvcc_ver} and torch's CUDA {torch.version.cuda} differ in the major version: stop")
        facts["stop"] = True
    elif not nvcc_ver and not c.dry_run:
        c.fail("no nvcc: the CUDA kernels cannot be built")
        facts["stop"] = True
    ninja = shutil.which("ninja")
    if ninja is None:
        try:
            import ninja as ninja_mod  # noqa: F401  (the pip package puts the binary beside itself)
            ninja = "python package"
        except ImportError:
            pass
    c.say(f"- ninja: {ninja or 'missing (the build would fall back to slow serial compiles)'}")
    missing = []
    for name in IMPORTS:
        try:
            __import__(name)
        except Exception as e:  # noqa: BLE001  (a broken install counts as missing)
            missing.append(f"{name} ({type(e).__name__})")
    c.say(f"- imports: {'all of ' + ', '.join(IMPORTS) if not missing else 'MISSING ' + ', '.join(missing)}")
    if missing:
        c.ok = False
    if facts["cuda"]:
        import torchvision

        boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], device="cuda")
        keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7], device="cuda"), 0.5).tolist()
        ok = keep == [0, 2]
        c.say(f"- torchvision.ops.nms on CUDA: {keep} ({'ok' if ok else 'WRONG, expected [0, 2]'}); "
              f"{torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}, "
              f"{os.cpu_count()} CPU cores")
        c.ok &= ok
    else:
        c.say("- no CUDA device: the CUDA call, the build and the tests are stubbed" if c.dry_run
              else "- no CUDA device")
        if not c.dry_run:
            c.fail("no CUDA device visible to torch")
            facts["stop"] = True
    return facts


def kernels_built() -> bool:
    code = "import torch, dynamask.ops as o; raise SystemExit(0 if o.cuda_available() else 1)"
    return subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True).returncode == 0


def build(c: Check, limit: float = 330) -> bool:
    """Builds the kernels in place for this GPU's own architecture only, on all cores."""
    import torch

    arch = "{}.{}".format(*torch.cuda.get_device_capability()) if torch.cuda.is_available() else "9.0"
    env = {"DYNAMASK_WITH_CUDA": "1", "TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(os.cpu_count() or 1),
           "CUDA_HOME": os.environ.get("CUDA_HOME", "/usr/local/cuda")}
    cmd = [PY, "setup.py", "-q", "build_ext", "--inplace"]
    shown = " ".join(f"{k}={v}" for k, v in env.items()) + " python " + " ".join(cmd[1:])
    if c.dry_run:
        c.say(f"- build: `{shown}` (dry run: not run)")
        return True
    c.env.update(env)
    rc, text, took = c.run(cmd, limit, log="build.log")
    if rc == 0 and kernels_built():
        c.say(f"- build: sm_{arch.replace('.', '')} in {took:.0f} s (`{shown}`)")
        return True
    c.fail(f"build (exit {rc}, {took:.0f} s); the end of build.log:")
    c.say("```\n" + "\n".join(text.strip().splitlines()[-15:]) + "\n```")
    return False


def cuda_test_files() -> list[str]:
    files = []
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "test_*.py"))):
        with open(path) as f:
            if "pytest.mark.cuda" in f.read():
                files.append(os.path.relpath(path, ROOT))
    return files


def summary(text: str) -> str:
    """pytest's last line: '3 passed, 1 failed, 2 skipped in 4.2s'."""
    for line in reversed(text.strip().splitlines()):
        if re.search(r"\b(passed|failed|error|errors|skipped|deselected|no tests ran|collected|selected)\b", line):
            return line.strip("= ").strip()
    return text.strip().splitlines()[-1] if text.strip() else "no output"


def run_tests(c: Check) -> None:
    """Each file with CUDA tests on its own, so that one missing module cannot stop the others."""
    files = cuda_test_files()
    c.say(f"## CUDA tests ({len(files)} files hold them)")
    c.say("| file | result | seconds |")
    c.say("|---|---|---|")
    extra = ["--collect-only", "-q"] if c.dry_run else ["-q", "-rfE", "-p", "no:cacheprovider"]
    for i, path in enumerate(files):
        share = c.left() / max(1, len(files) - i)  # an even share of what is left
        rc, text, took = c.run([PY, "-m", "pytest", "-m", "cuda", path, *extra], share, log="tests.log")
        line = summary(text)
        # on the GPU, a file whose CUDA tests all skipped (kernels not found) failed too
        bad = rc not in (0, 5) or re.search(r"\b(failed|error)", line) is not None
        bad = bad or (not c.dry_run and "passed" not in line)
        if bad and not c.dry_run:
            c.ok = False
        c.say(f"| {path} | {'**' if bad else ''}{line}{'**' if bad else ''} | {took:.0f} |")


# ------------------------------------------------------------------------------------------ phase 2


def images_per_second(text: str) -> list[str]:
    """The e2e table's rows as 'model: N images/s (ratio x torchvision's time)'."""
    rows = []
    for line in text.splitlines():
        cells = [x.strip() for x in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and re.fullmatch(r"[\d.]+", cells[2] or "x"):
            rows.append(f"{cells[0]}: {cells[2]} images/s, {cells[3]}x torchvision's time")
    return rows


def run_benchmarks(c: Check) -> None:
    c.say("## GPU benchmarks (quick sizes; ratios are against torchvision in the same run)")
    for i, (name, args, out_file, cap) in enumerate(BENCHMARKS):
        if c.dry_run:
            c.say(f"- {name}: `python {' '.join(args)}` -> {out_file} (dry run: not run)")
            continue
        rc, text, took = c.run([PY, *args], min(cap, c.left() / max(1, len(BENCHMARKS) - i)), log="benchmarks.log")
        with open(os.path.join(c.out, out_file), "w") as f:
            f.write(text)
        if rc:
            c.fail(f"{name} (exit {rc}, {took:.0f} s): {text.strip().splitlines()[-1:] }")
            continue
        c.say(f"- {name}: {took:.0f} s, table in {out_file}")
        if name == "end to end":
            c.say("")
            c.say("Images per second, DynaMask against Mask R-CNN (the paper's FPS table):")
            for row in images_per_second(text):
                c.say(f"  - {row}")


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=["1", "2", "all"], default="1")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: stub the GPU steps, show the structure")
    ap.add_argument("--budget", type=float, default=540, help="seconds for this call (the tool allows 600)")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "gpu_out"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    c = Check(args.out, args.budget, args.dry_run)
    phases = ["1", "2"] if args.phase == "all" else [args.phase]
    try:
        install_wheels(c)
        facts = preflight(c)
        if facts.get("stop"):
            return
        c.say("## Build")
        if "1" in phases or c.dry_run or not kernels_built():
            if "1" not in phases:
                c.say("- phase 2 builds first when the CUDA kernels are missing (a fresh machine)")
            if not build(c):
                return
        else:
            c.say("- the CUDA kernels are already built")
        if "1" in phases:
            run_tests(c)
        if "2" in phases:
            run_benchmarks(c)
    finally:
        c.write(f"phase {args.phase}" + (" (dry run)" if args.dry_run else ""))


if __name__ == "__main__":
    main()

"""The GPU check: build the CUDA kernels for your GPU, run every CUDA test and the GPU benchmarks, and write
a markdown verdict to OUT/verdict.md (OUT: --out, else $OUT, else ./gpu_out), with the logs beside it.

    python3 scripts/gpu_check.py --phase 1      # preflight, build for this GPU, the CUDA tests
    python3 scripts/gpu_check.py --phase 2      # the GPU benchmarks, end to end first
    python3 scripts/gpu_check.py --phase all    # both, one after the other
    python3 scripts/gpu_check.py --dry-run      # without a GPU: the preflight, the plan, a verdict skeleton

Phase 1 keeps its build: the compiled extension is copied to OUT/build/ with a note of the torch, CUDA,
GPU and source it was built for, and phase 2 reuses it when they all match (so phase 2, run later or on
another machine of the same kind, spends its time on the benchmarks). The CUDA tests run in one pytest
process, the quick op tests first, each test under its own timeout (pytest-timeout, when installed).
--budget-seconds bounds the whole run: every step gets a deadline, so a hung step still leaves a verdict.
On a machine without network access, put the wheels of missing test dependencies in a folder and pass
--wheels DIR (scripts/fetch_gpu_wheels.sh downloads them elsewhere): they are installed to a temporary
folder, never into your environment.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
IMPORTS = ["torch", "torchvision", "pycocotools", "PIL", "expecttest", "hypothesis", "numpy", "pytest"]
# The CUDA test files, quickest first, so that a short budget still covers the kernels; a file not named
# here runs after these, in name order.
TEST_ORDER = [
    "tests/test_ops_edge_cases.py",
    "tests/test_group_by_resolution.py",
    "tests/test_paste_masks.py",
    "tests/test_roi_align.py",
    "tests/test_deform_conv2d.py",
]
# (name, command after the interpreter, output file, seconds at most); quick sizes, ratios vs torchvision.
# End to end first: it is the figure that matters most (images per second against Mask R-CNN).
BENCHMARKS = [
    ("end to end", ["benchmarks/e2e.py", "--device", "cuda", "--images", "2", "--reps", "5"], "e2e_cuda.md", 180),
    ("mask head", ["benchmarks/mask_head.py", "--device", "cuda", "--repeats", "5"], "mask_head_cuda.md", 90),
    ("RoIAlign", ["benchmarks/roi_align.py", "--device", "cuda", "--reps", "5"], "roi_align_cuda.md", 90),
    ("deform conv", ["benchmarks/deform_conv.py", "--device", "cuda", "--quick", "--no-memory"],
     "deform_conv_cuda.md", 120),
    ("paste", ["benchmarks/paste.py", "--device", "cuda", "--reps", "5"], "paste_cuda.md", 90),
]
MARGIN = 15.0  # seconds kept for writing the verdict


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
        # cuBLAS needs a fixed workspace for the tests that run under torch.use_deterministic_algorithms
        self.env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

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
        limit = max(1.0, min(limit, self.left() - MARGIN))
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
        path = os.path.join(self.out, "verdict.md")
        with open(path + ".tmp", "w") as f:
            f.write("\n".join(head + self.lines) + "\n")
        os.replace(path + ".tmp", path)
        print(f"\nverdict written to {path} ({'PASS' if self.ok else 'FAIL'}, {took:.0f} s)")


# ------------------------------------------------------------------------------------------ set-up


def install_wheels(c: Check, folder: str | None) -> None:
    if not folder:
        return
    wheels = sorted(glob.glob(os.path.join(folder, "*.whl")))
    if not wheels:
        c.say(f"- wheels: none in {folder}")
        return
    site = tempfile.mkdtemp(prefix="dynamask-gpu-check-site.")
    cmd = [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", site, *wheels]
    if c.dry_run:
        c.say(f"- wheels: would install {len(wheels)} from {folder} to a temporary folder (dry run)")
        return
    rc, text, _ = c.run(cmd, 120)
    if rc:
        c.fail(f"installing {folder}/*.whl: {text.strip().splitlines()[-1:]}")
        return
    sys.path.insert(0, site)
    c.env["PYTHONPATH"] = os.pathsep.join([site, c.env["PYTHONPATH"]])
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
    facts["nvcc"] = nvcc_ver
    c.say(f"- nvcc: {nvcc_ver or 'not found'} (torch built with CUDA {torch.version.cuda})")
    if nvcc_ver and torch.version.cuda and nvcc_ver.split(".")[0] != torch.version.cuda.split(".")[0]:
        c.fail(f"nvcc {nvcc_ver} and torch's CUDA {torch.version.cuda} differ in the major version: stop")
        facts["stop"] = True
    ninja = shutil.which("ninja")
    if ninja is None:
        try:
            import ninja as ninja_mod  # noqa: F401  (the pip package puts the binary beside itself)
            ninja = "python package"
        except ImportError:
            pass
    c.say(f"- ninja: {ninja or 'missing (the build falls back to slow serial compiles)'}")
    try:
        import pytest_timeout  # noqa: F401

        facts["timeout_plugin"] = True
    except ImportError:
        facts["timeout_plugin"] = False
    c.say("- pytest-timeout: " + ("installed (a timeout per test)" if facts["timeout_plugin"]
                                   else "missing: the tests get only the whole run's deadline"))
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
        facts["gpu"] = torch.cuda.get_device_name()
        facts["capability"] = "{}.{}".format(*torch.cuda.get_device_capability())
        c.say(f"- torchvision.ops.nms on CUDA: {keep} ({'ok' if ok else 'WRONG, expected [0, 2]'}); "
              f"{facts['gpu']}, capability {facts['capability']}, {os.cpu_count()} CPU cores")
        c.ok &= ok
    elif c.dry_run:
        facts["gpu"], facts["capability"] = "none (dry run)", "9.0"
        c.say("- no CUDA device: the CUDA call, the build and the tests are stubbed")
    else:
        c.fail("no CUDA device visible to torch")
        facts["stop"] = True
    if not nvcc_ver and not c.dry_run:
        facts["no_nvcc"] = True  # a kept build can still serve phase 2
    return facts


# ------------------------------------------------------------------------------------------ the build


def source_hash() -> str:
    """A digest of what the kernels are compiled from, so that a kept build of other sources is not reused."""
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True)) + [
            os.path.join(ROOT, "setup.py")]:
        if os.path.isfile(path):
            h.update(os.path.relpath(path, ROOT).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


def build_key(facts: dict) -> dict:
    import torch

    return {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
            "capability": facts.get("capability"), "sources": source_hash()}


def kernels_built() -> bool:
    code = "import torch, dynamask.ops as o; raise SystemExit(0 if o.cuda_available() else 1)"
    return subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True).returncode == 0


def built_library() -> str | None:
    found = sorted(glob.glob(os.path.join(ROOT, "dynamask", "_C*.so")), key=os.path.getmtime)
    return found[-1] if found else None


def keep_build(c: Check, facts: dict, keep_dir: str) -> None:
    """Copies the compiled extension and its key to keep_dir (phase 2 reuses it)."""
    lib = built_library()
    if c.dry_run:
        c.say(f"- kept build: would copy dynamask/_C*.so and build.json to {keep_dir} (dry run)")
        return
    if lib is None:
        c.fail("the build left no dynamask/_C*.so to keep")
        return
    os.makedirs(keep_dir, exist_ok=True)
    shutil.copy2(lib, os.path.join(keep_dir, os.path.basename(lib)))
    with open(os.path.join(keep_dir, "build.json"), "w") as f:
        json.dump(dict(build_key(facts), library=os.path.basename(lib)), f, indent=1)
    c.say(f"- kept build: {os.path.basename(lib)} ({os.path.getsize(lib) / 2**20:.0f} MiB) in {keep_dir}")


def reuse_build(c: Check, facts: dict, keep_dir: str) -> bool:
    """Puts a kept build in place when it was made for this torch, CUDA, Python, GPU and source."""
    meta = os.path.join(keep_dir, "build.json")
    if not os.path.isfile(meta):
        c.say(f"- no kept build in {keep_dir}")
        return False
    with open(meta) as f:
        kept = json.load(f)
    want = build_key(facts)
    differ = [k for k in want if kept.get(k) != want[k]]
    if differ:
        c.say(f"- the kept build in {keep_dir} was made for another {', '.join(differ)}: not reused")
        return False
    if c.dry_run:
        c.say(f"- kept build in {keep_dir} matches (dry run: not copied)")
        return True
    src = os.path.join(keep_dir, kept["library"])
    dst = os.path.join(ROOT, "dynamask", kept["library"])
    shutil.copy2(src, dst + ".tmp")
    os.replace(dst + ".tmp", dst)
    if kernels_built():
        c.say(f"- reused the kept build from {keep_dir} ({kept['library']})")
        return True
    c.say(f"- the kept build in {keep_dir} does not load here: rebuilding")
    return False


def build(c: Check, facts: dict) -> bool:
    """Builds the kernels in place for this GPU's own architecture only, on all cores."""
    arch = facts.get("capability") or "9.0"
    env = {"DYNAMASK_WITH_CUDA": "1", "TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(os.cpu_count() or 1),
           "CUDA_HOME": os.environ.get("CUDA_HOME", "/usr/local/cuda")}
    cmd = [PY, "setup.py", "-q", "build_ext", "--inplace"]
    shown = " ".join(f"{k}={v}" for k, v in env.items()) + " python " + " ".join(cmd[1:])
    if c.dry_run:
        c.say(f"- build: `{shown}` (dry run: not run)")
        return True
    if facts.get("no_nvcc"):
        c.fail("no nvcc, and no kept build to reuse: the CUDA kernels cannot be built")
        return False
    c.env.update(env)
    rc, text, took = c.run(cmd, 600, log="build.log")
    if rc == 0 and kernels_built():
        c.say(f"- build: sm_{arch.replace('.', '')} in {took:.0f} s (`{shown}`)")
        return True
    c.fail(f"build (exit {rc}, {took:.0f} s); the end of build.log:")
    c.say("```\n" + "\n".join(text.strip().splitlines()[-15:]) + "\n```")
    return False


# ------------------------------------------------------------------------------------------ phase 1


def cuda_test_files() -> list[str]:
    """The test files that hold CUDA tests, quickest first (TEST_ORDER, then the rest by name)."""
    files = []
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "test_*.py"))):
        with open(path) as f:
            if "pytest.mark.cuda" in f.read():
                files.append(os.path.relpath(path, ROOT))
    rank = {name: i for i, name in enumerate(TEST_ORDER)}
    return sorted(files, key=lambda p: (rank.get(p, len(rank)), p))


_OUTCOME = re.compile(r"^(tests/\S+?\.py)::\S+ (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def tally(text: str, files: list[str]) -> dict[str, dict[str, int]]:
    """Per file, how many tests passed, failed, errored or skipped, read from pytest's -v lines."""
    counts = {f: {"passed": 0, "failed": 0, "error": 0, "skipped": 0} for f in files}
    key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped",
           "XFAIL": "skipped"}
    for line in text.splitlines():
        m = _OUTCOME.match(line.strip())
        if m and m.group(1) in counts:
            counts[m.group(1)][key[m.group(2)]] += 1
    return counts


def run_tests(c: Check, facts: dict, test_timeout: float) -> None:
    """All CUDA tests in one pytest process, the files in cuda_test_files' order."""
    files = cuda_test_files()
    c.say(f"## CUDA tests ({len(files)} files hold them, run in this order in one process)")
    cmd = [PY, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider", "-o", "addopts=", *files]
    if c.dry_run:
        rc, text, took = c.run(cmd + ["--collect-only", "-q"], 300, log="tests.log")
        m = re.search(r"(\d+)(?:/(\d+))? tests? (?:collected|selected)", text)
        found = f"{m.group(1)} CUDA tests" + (f" (of {m.group(2)} in these files)" if m.group(2) else "") if m else (
            text.strip().splitlines()[-1:])
        c.say(f"- collected: {found} in {took:.0f} s (dry run: not run); the order:")
        for path in files:
            c.say(f"  - {path}")
        if rc not in (0, 5):
            c.fail(f"collecting the CUDA tests (exit {rc}): see tests.log")
        return
    if facts.get("timeout_plugin"):
        cmd += ["-p", "pytest_timeout", f"--timeout={test_timeout:.0f}", "--timeout-method=thread"]
    rc, text, took = c.run(cmd + ["-v", "-rfE"], c.left(), log="tests.log")
    counts = tally(text, files)
    c.say("| file | passed | failed | errors | skipped |")
    c.say("|---|---|---|---|---|")
    for path in files:
        n = counts[path]
        bad = n["failed"] or n["error"] or not n["passed"]
        mark = "**" if bad else ""
        c.say(f"| {mark}{path}{mark} | {n['passed']} | {n['failed']} | {n['error']} | {n['skipped']} |")
        if bad:
            c.ok = False  # on the GPU, a file whose CUDA tests all skipped (kernels not found) failed too
    c.say("")
    last = [ln for ln in text.strip().splitlines() if re.search(r"\b(passed|failed|error)", ln)][-1:]
    c.say(f"- pytest: {last[0].strip('= ') if last else 'no summary'} (exit {rc}, {took:.0f} s; tests.log)")
    if rc == 124:
        c.fail("the tests ran past the budget: raise --budget-seconds; the table counts what finished")
    elif rc not in (0, 1):
        c.fail(f"pytest exited {rc}: see tests.log")
    for line in text.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            c.say(f"  - {line[:300]}")


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
    for name, args, out_file, cap in BENCHMARKS:
        if c.dry_run:
            c.say(f"- {name}: `python {' '.join(args)}` -> {out_file}, at most {cap} s (dry run: not run)")
            continue
        if c.left() - MARGIN < 20:
            c.fail(f"{name}: no time left in the budget (raise --budget-seconds)")
            continue
        rc, text, took = c.run([PY, *args], cap, log="benchmarks.log")
        with open(os.path.join(c.out, out_file), "w") as f:
            f.write(text)
        if rc:
            c.fail(f"{name} (exit {rc}, {took:.0f} s): {text.strip().splitlines()[-1:]}")
            continue
        c.say(f"- {name}: {took:.0f} s, table in {out_file}")
        if name == "end to end":
            c.say("")
            c.say("Images per second, DynaMask against Mask R-CNN (the paper's FPS table):")
            for row in images_per_second(text):
                c.say(f"  - {row}")
            c.say("")


# ------------------------------------------------------------------------------------------ main


def main() -> bool:
    """Runs the check; True when the verdict is PASS."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=["1", "2", "all"], default="1",
                    help="1: build and CUDA tests; 2: benchmarks; all: both (default: %(default)s)")
    ap.add_argument("--dry-run", action="store_true", help="without a GPU: stub the GPU steps, show the plan")
    ap.add_argument("--budget-seconds", "--budget", dest="budget", type=float, default=900,
                    help="wall-clock seconds for the whole run; every step gets a deadline (default: %(default)s)")
    ap.add_argument("--test-timeout", type=float, default=180,
                    help="seconds per CUDA test, with pytest-timeout installed (default: %(default)s)")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "gpu_out"),
                    help="where the verdict, logs and tables go (default: $OUT, else ./gpu_out)")
    ap.add_argument("--build-dir", default=None,
                    help="where phase 1 keeps the compiled extension and phase 2 looks for it "
                         "(default: OUT/build)")
    ap.add_argument("--wheels", default=None,
                    help="a folder of wheels for missing test dependencies, installed to a temporary folder")
    args = ap.parse_args()
    if not args.budget > 60:
        ap.error(f"--budget-seconds must be more than 60, got {args.budget}")
    os.makedirs(args.out, exist_ok=True)
    keep_dir = args.build_dir or os.path.join(args.out, "build")
    c = Check(args.out, args.budget, args.dry_run)
    phases = ["1", "2"] if args.phase == "all" else [args.phase]
    try:
        install_wheels(c, args.wheels)
        facts = preflight(c)
        if facts.get("stop"):
            return False
        c.say("## Build")
        if "1" in phases:
            if not build(c, facts):
                return False
            keep_build(c, facts, keep_dir)
        elif c.dry_run or not kernels_built():
            if not reuse_build(c, facts, keep_dir) and not build(c, facts):
                return False
        else:
            c.say("- the CUDA kernels are already built")
        if "1" in phases:
            run_tests(c, facts, args.test_timeout)
        if "2" in phases:
            run_benchmarks(c)
    finally:
        c.write(f"phase {args.phase}" + (" (dry run)" if args.dry_run else ""))
    return c.ok


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

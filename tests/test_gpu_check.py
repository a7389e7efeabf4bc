"""scripts/gpu_check.py's bookkeeping, which must work the first time it meets a GPU: the kept build is
reused only for the same torch, CUDA, Python, GPU and sources; the CUDA test files run quickest first; the
per-file table is read from pytest's verbose lines; and a dry run of both phases reaches a verdict."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture()
def gc(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "scripts", "gpu_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # a fake checkout: sources and one compiled library
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "a.cu").write_text("kernel v1")
    (tmp_path / "setup.py").write_text("")
    (tmp_path / "dynamask").mkdir()
    (tmp_path / "dynamask" / "_C.cpython-3x.so").write_bytes(b"built")
    monkeypatch.setattr(mod, "ROOT", str(tmp_path))
    monkeypatch.setattr(mod, "kernels_built", lambda: True)
    return mod


def _check(gc, tmp_path, dry_run=False):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return gc.Check(str(out), 100.0, dry_run)


def test_kept_build_is_reused_only_when_everything_matches(gc, tmp_path):
    c = _check(gc, tmp_path)
    facts = {"capability": "9.0"}
    keep = str(tmp_path / "out" / "build")
    gc.keep_build(c, facts, keep)
    meta = json.loads((tmp_path / "out" / "build" / "build.json").read_text())
    assert meta["capability"] == "9.0" and meta["library"] == "_C.cpython-3x.so"
    (tmp_path / "dynamask" / "_C.cpython-3x.so").unlink()  # a fresh machine: nothing built in place
    assert gc.reuse_build(c, facts, keep)
    assert (tmp_path / "dynamask" / "_C.cpython-3x.so").read_bytes() == b"built"
    # another GPU, or changed sources: built anew
    assert not gc.reuse_build(c, {"capability": "8.0"}, keep)
    (tmp_path / "csrc" / "a.cu").write_text("kernel v2")
    assert not gc.reuse_build(c, facts, keep)
    assert any("another capability" in line for line in c.lines)
    assert any("another sources" in line for line in c.lines)
    assert not gc.reuse_build(c, facts, str(tmp_path / "nowhere"))
    assert c.ok  # not reusing is not a failure


def test_cuda_test_files_run_quickest_first(gc, monkeypatch):
    monkeypatch.setattr(gc, "ROOT", ROOT)
    files = gc.cuda_test_files()
    assert files[: len(gc.TEST_ORDER)] == gc.TEST_ORDER
    assert files[len(gc.TEST_ORDER):] == sorted(files[len(gc.TEST_ORDER):])
    for path in files:
        with open(os.path.join(ROOT, path)) as f:
            assert "pytest.mark.cuda" in f.read()


def test_tally_reads_pytest_verbose_lines(gc):
    text = "\n".join([
        "tests/test_a.py::test_x[cuda] PASSED                       [ 10%]",
        "tests/test_a.py::test_y[cuda] FAILED                       [ 20%]",
        "tests/test_b.py::test_z ERROR                              [ 30%]",
        "tests/test_b.py::test_w[cuda-2] SKIPPED (needs x)          [ 40%]",
        "tests/test_b.py::test_v PASSED                             [ 50%]",
        "FAILED tests/test_a.py::test_y[cuda] - AssertionError",
    ])
    counts = gc.tally(text, ["tests/test_a.py", "tests/test_b.py", "tests/test_c.py"])
    assert counts["tests/test_a.py"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 0}
    assert counts["tests/test_b.py"] == {"passed": 1, "failed": 0, "error": 1, "skipped": 1}
    assert counts["tests/test_c.py"] == {"passed": 0, "failed": 0, "error": 0, "skipped": 0}


@pytest.mark.parametrize("phase", ["1", "2"])
def test_dry_run_reaches_a_verdict(tmp_path, phase):
    out = tmp_path / "gpu"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_check.py"), "--phase", phase,
                        "--dry-run", "--out", str(out), "--budget-seconds", "300"],
                       capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stdout + r.stderr
    verdict = (out / "verdict.md").read_text()
    assert verdict.startswith(f"# GPU check: phase {phase} (dry run)")
    assert "Verdict: **PASS** (dry run: GPU steps stubbed)" in verdict
    if phase == "1":
        assert "CUDA tests" in verdict and "tests/test_ops_edge_cases.py" in verdict
    else:
        assert verdict.index("- end to end:") < verdict.index("- RoIAlign:")

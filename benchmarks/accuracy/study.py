"""The accuracy study's folder (:class:`Study`): resumable phase by phase and row by row.

``OUT/data`` holds the generated shapes, ``OUT/ckpt/NAME.pth`` each trained phase (and the switches, the
switch fit's cache), ``OUT/rows/NAME.json`` each finished row, ``OUT/meta.json`` the configuration, timings
and the base model's per-category numbers; ``accuracy_cpu.md``/``.json`` and the plots are rewritten from the
rows after each one (:mod:`.report`)."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from typing import Any

import torch

from .config import ROOT, VARIANT_FIELDS, StudyConfig
from .phases import (
    build_dynamask,
    build_maskrcnn,
    datasets,
    load_state,
    log,
    save_json,
    save_state,
    train_phase,
    train_switches,
)
from .report import write_report
from .rows import StudyRows


class Study(StudyRows):
    def __init__(self, cfg: StudyConfig, out: str, *, progress: bool = True) -> None:
        self.cfg, self.out, self.progress = cfg, out, progress
        self.maskrcnn_ckpt: str | None = None  # --part grid: a Mask R-CNN row trained in another folder
        for d in ("ckpt", "rows"):
            os.makedirs(os.path.join(out, d), exist_ok=True)
        self.train, self.val = datasets(cfg, out)
        self.meta_path = os.path.join(out, "meta.json")
        self.meta: dict[str, Any] = json.load(open(self.meta_path)) if os.path.exists(self.meta_path) else {}
        saved = self.meta.get("config")
        now = json.loads(json.dumps(asdict(cfg)))
        # the variant lists may grow between runs (each row is its own file; a missing switch is trained on
        # the same frozen model); anything else changed would mix two studies
        fixed = [k for k in now if k not in VARIANT_FIELDS]
        if saved is not None and any(saved.get(k) != now[k] for k in fixed):
            raise SystemExit(f"{out} holds a study with another configuration; use a new --out (or delete it)")
        self.meta["config"] = now
        self.meta.setdefault("timings", {})
        self.save_meta()

    # -- bookkeeping
    def save_meta(self) -> None:
        """Writes meta.json, merged with what another process on the same study wrote since this one read it
        (two single-thread processes sharing the rows): the timings are united, and a key this process has
        not set (e.g. the base model's ``iou_gain``, set by the other) is kept; this process's values win."""
        if os.path.exists(self.meta_path):
            with open(self.meta_path) as f:
                disk = json.load(f)
            for name, info in disk.get("timings", {}).items():
                self.meta.setdefault("timings", {}).setdefault(name, info)
            for key, value in disk.items():
                self.meta.setdefault(key, value)
        save_json(self.meta_path, self.meta)

    def ckpt(self, name: str) -> str:
        return os.path.join(self.out, "ckpt", f"{name}.pth")

    def row_path(self, name: str) -> str:
        return os.path.join(self.out, "rows", f"{name}.json")

    def have_rows(self, names) -> bool:
        return all(os.path.exists(self.row_path(n)) for n in names)

    def timing(self, name: str, info: dict[str, float]) -> None:
        self.meta["timings"][name] = info
        self.save_meta()
        log(f"{name}: {info['seconds'] / 60:.1f} min ({info.get('sec_per_iter', 0):.2f} s/it)")

    def save_rows(self, rows: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
        for row in rows:
            save_json(self.row_path(row["name"]), row)
        if extra:
            self.meta.update(extra)
            self.save_meta()
        self.report()

    def report(self) -> None:
        rows = []
        for fn in sorted(os.listdir(os.path.join(self.out, "rows"))):
            if fn.endswith(".json"):
                with open(os.path.join(self.out, "rows", fn)) as f:
                    rows.append(json.load(f))
        write_report(self.out, self.cfg, self.meta, rows, self.planned_rows())

    def planned_rows(self) -> list[str]:
        res = [self.cfg.arch["mask_roi_size"] * 2**k for k in range(4)]
        return ([f"fixed-{s}" for s in res] + ["size-rule", "oracle"] + [v.name for v in self.cfg.switches]
                + (self.cfg.fit.names() if self.cfg.fit else [])
                + (self.cfg.train_fit.names() + self.cfg.train_fit.own_rows(res) if self.cfg.train_fit else [])
                + (self.cfg.train_fit_unweighted.names() if self.cfg.train_fit_unweighted else [])
                + [v.name for v in self.cfg.coupled] + ["maskrcnn-28"])

    # -- phases
    def model_from(self, name: str, **routing: Any):
        model = build_dynamask(self.cfg, **routing)
        model.load_state_dict(load_state(self.ckpt(name))["model"], strict=True)
        return model

    def pretrain(self) -> None:
        if os.path.exists(self.ckpt("pretrain")):
            return
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        model = build_dynamask(cfg)
        model.mask_training = "pretrain"
        info = train_phase(model, self.train, cfg, iters=cfg.pretrain_iters, seed=cfg.seed, lr=cfg.lr,
                           warmup=cfg.warmup, drop_at=None, desc="pretrain (every resolution)")
        save_state(self.ckpt("pretrain"), {"model": model.state_dict()})
        self.timing("pretrain", info)

    def base(self) -> None:
        if os.path.exists(self.ckpt("base")):
            return
        model = self.model_from("pretrain")
        model.mask_training = "pretrain"
        info = train_phase(model, self.train, self.cfg, iters=self.cfg.phase_iters, seed=self.cfg.seed + 1,
                           lr=self.cfg.lr / 10, warmup=0, drop_at=None, desc="base (pretrain continued)")
        save_state(self.ckpt("base"), {"model": model.state_dict()})
        self.timing("base", info)

    def switches(self) -> dict[str, Any]:
        """Every frozen-model switch's weights; the ones not trained yet (a variant added since) are trained
        now, on the same batches as the others (same seed)."""
        path = self.ckpt("switches")
        state = load_state(path) if os.path.exists(path) else {}
        todo = [v for v in self.cfg.switches if v.name not in state]
        if todo:
            model = self.model_from("base")
            new, info = train_switches(model, self.train, self.cfg, todo, seed=self.cfg.seed + 2)
            state.update(new)
            save_state(path, state)
            self.timing("switches" if len(todo) == len(self.cfg.switches) else f"switches+{len(todo)}", info)
        return state

    def grid(self, maskrcnn_ckpt: str | None = None) -> None:
        """``OUT/grid.png``: the same validation instances at each resolution of the base model and from the
        Mask R-CNN row's head (its checkpoint here, or ``maskrcnn_ckpt``: a Mask R-CNN row trained in another
        folder with the same data and seed)."""
        from .grid import picture_grid

        path = maskrcnn_ckpt or self.ckpt("maskrcnn")
        maskrcnn = None
        if os.path.exists(path):
            maskrcnn = build_maskrcnn(self.cfg)
            maskrcnn.load_state_dict(load_state(path)["model"])
        picture_grid(self.model_from("base"), maskrcnn, self.val, os.path.join(self.out, "grid.png"))
        log(f"picture grid: {os.path.join(self.out, 'grid.png')}")

    def run(self, part: str = "all", split_argv: list[str] | None = None) -> None:
        """``part``: "all"; "dynamask" (every row but Mask R-CNN's); "maskrcnn" (only that row); "ladder" (the
        base model's rows only: fixed resolutions, size rule, oracle, and whatever switch variants the config
        holds).

        ``split_argv`` (with "all"): after the pretrain, which uses every thread, the Mask R-CNN row runs in
        a second process on one thread (``python -m benchmarks.accuracy`` with these arguments, ``--part
        maskrcnn``, in ``OUT/maskrcnn``; the repository root on its ``PYTHONPATH``) while this one continues on
        one thread; its row is copied in when both are done. On 2 cores that is ~40 min faster than one process
        doing everything in turn.
        """
        t0 = time.time()
        self.report()
        helper = None
        if part == "ladder":
            self.pretrain()
            self.base()
            self.base_rows()
        if part == "grid":
            self.grid(self.maskrcnn_ckpt)
            return
        if part in ("all", "dynamask"):
            self.pretrain()
            if split_argv is not None and part == "all" and not self.have_rows(["maskrcnn-28"]):
                import subprocess

                cmd = [sys.executable, "-m", "benchmarks.accuracy", *split_argv, "--part", "maskrcnn", "--threads",
                       "1", "--out", os.path.join(self.out, "maskrcnn")]
                # the same working directory (so a relative --out is the same folder), the package found from
                # the repository root
                path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
                log("Mask R-CNN row in a second process: " + " ".join(cmd[1:]))
                helper = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": path}, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)
                torch.set_num_threads(1)
            self.base()
            self.base_rows()
            self.fit_rows(self.cfg.fit)
            for i, v in enumerate(self.cfg.coupled):
                if i == self.cfg.maskrcnn_after and part == "all" and helper is None:
                    self.maskrcnn_row()
                self.coupled_row(v)
                if i == 0:  # the default dynamic-phase row: the fit `dynamask train` ends with, on its model
                    self.fit_rows(self.cfg.train_fit)
                    self.fit_rows(self.cfg.train_fit_unweighted)
        if helper is not None:
            self._join_maskrcnn(helper)
        if part in ("all", "maskrcnn"):
            self.maskrcnn_row()  # (a no-op when the second process wrote the row)
        self.meta["timings"]["this_run_minutes"] = {"seconds": time.time() - t0}
        self.save_meta()
        self.report()
        log(f"done: {self.out}")

    def _join_maskrcnn(self, helper) -> None:
        """Waits for the second process; copies its row and timings in."""
        import shutil

        if helper.wait() != 0:
            raise SystemExit(f"the Mask R-CNN process failed (exit {helper.returncode}); rerun with --part maskrcnn "
                             f"--out {os.path.join(self.out, 'maskrcnn')} to see why")
        sub = os.path.join(self.out, "maskrcnn")
        shutil.copyfile(os.path.join(sub, "rows", "maskrcnn-28.json"), self.row_path("maskrcnn-28"))
        with open(os.path.join(sub, "meta.json")) as f:
            for name, info in json.load(f).get("timings", {}).items():
                if name.startswith("maskrcnn"):
                    self.meta["timings"][name] = info
        self.save_meta()

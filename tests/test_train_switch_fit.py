"""The switch fit that ends a DynaMask training run (``dynamask.engine.switch_life``): it equals the
library's fit of the trained model, changes nothing but the switch, resumes exactly through a fit made at a
stop, is skipped with ``--switch paper``; and the sharded batches of a DDP fit (DDP itself:
test_train_ddp.py)."""

import pytest
import torch
from model_helpers import TRAIN_TINY, shapes_fixture, train_config  # noqa: F401  (shapes_fixture: a fixture)

from dynamask.data import CocoDetection
from dynamask.data.shapes import split_paths
from dynamask.engine import switch_fit, switch_life
from dynamask.engine.checkpoint import load_checkpoint, model_from_checkpoint
from dynamask.engine.train import train

TINY = TRAIN_TINY


_cfg = train_config


@pytest.fixture(scope="module")
def fitted_run(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("fitted")
    return out, train(_cfg(shapes, out))


def _msm(state):
    return {k.removeprefix("roi_heads.msm."): v for k, v in state.items() if k.startswith("roi_heads.msm.")}


def test_the_run_ends_with_the_librarys_fit_of_the_trained_model(shapes, fitted_run):
    out, result = fitted_run
    assert result["status"] == "done" and result["iteration"] == 6
    ckpt = load_checkpoint(result["checkpoint"])
    fit = ckpt["extra"]["switch_fit"]
    assert result["switch_fit"] == fit and fit["batches"] == 3 and fit["epochs"] == 2 and fit["world_size"] == 1
    assert any(line.startswith("switch: fitted when training ends") for line in result["plan"])
    dynamic = switch_life.dynamic_phase_switch(ckpt)
    assert dynamic is not None and dynamic.keys() == _msm(ckpt["model"]).keys()
    # the reference: the trained model with its dynamic-phase switch, fitted by the library with the same data
    model, _ = model_from_checkpoint(result["checkpoint"])
    assert switch_life.use_dynamic_phase_switch(model, ckpt)
    for k, v in model.roi_heads.msm.state_dict().items():
        assert torch.equal(v, dynamic[k]), k
    img, ann = split_paths(shapes, "train")
    report = switch_fit.fit_model_switch(model, CocoDetection(img, ann), target_gmacs=model.roi_heads.target_gmacs,
                                         num_batches=3, batch_size=2, epochs=2, seed=5, calibration_images=3,
                                         progress=False)
    assert report.rois == fit["rois"] and report.mu == pytest.approx(fit["mu"], rel=0, abs=0)
    assert report.target_gmacs == pytest.approx(ckpt["arch"]["kwargs"]["target_gmacs"])
    saved = _msm(ckpt["model"])
    for k, v in model.roi_heads.msm.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert not torch.equal(saved["heads.0.fc2.weight"], dynamic["heads.0.fc2.weight"])  # the fit changed the switch


def test_no_switch_fit_keeps_the_dynamic_phase_switch_and_the_fit_touches_only_the_switch(shapes, fitted_run,
                                                                                       tmp_path):
    _, fitted = fitted_run
    result = train(_cfg(shapes, tmp_path, switch="paper"))
    plain = load_checkpoint(result["checkpoint"])
    assert "switch_fit" not in plain["extra"] and "states" not in plain and "switch_fit" not in result
    assert not any("fitted" in line for line in result["plan"])
    ckpt = load_checkpoint(fitted["checkpoint"])
    for k, v in plain["model"].items():
        expected = ckpt["model"][k] if not k.startswith("roi_heads.msm.") else \
            switch_life.dynamic_phase_switch(ckpt)[k.removeprefix("roi_heads.msm.")]
        assert torch.equal(v, expected), k
    assert torch.equal(plain["rng"]["torch"], ckpt["rng"]["torch"])  # the fit left the run's RNG as it was


def test_a_run_fitted_at_a_stop_resumes_exactly_and_is_fitted_again(shapes, fitted_run, tmp_path):
    _, full = fitted_run
    first = train(_cfg(shapes, tmp_path, max_iters=4))  # stops mid-way through the dynamic epoch, then fits
    assert first["status"] == "stopped" and first["stop_reason"] == "max_iters" and "switch_fit" in first
    stopped = load_checkpoint(first["checkpoint"])
    assert stopped["iteration"] == 4 and "switch_fit" in stopped["extra"]
    second = train(_cfg(shapes, tmp_path, resume="auto"))  # trains on from the dynamic phase's switch
    assert second["status"] == "done" and second["iteration"] == 6 and "switch_fit" in second
    a, b = load_checkpoint(full["checkpoint"]), load_checkpoint(second["checkpoint"])
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, v in switch_life.dynamic_phase_switch(a).items():
        assert torch.equal(v, switch_life.dynamic_phase_switch(b)[k]), k
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    # resumed with nothing left to train: no second fit, the checkpoint keeps the fit and the dynamic switch
    third = train(_cfg(shapes, tmp_path, resume="auto"))
    assert third["status"] == "done" and "switch_fit" not in third
    c = load_checkpoint(third["checkpoint"])
    assert c["extra"]["switch_fit"] == b["extra"]["switch_fit"]
    for k in b["model"]:
        assert torch.equal(b["model"][k], c["model"][k]), k


def test_bad_switch_fit_settings_are_refused_before_training(shapes, tmp_path):
    for field, value in (("switch_fit_batches", 0), ("switch_fit_epochs", 0), ("switch_fit_calibration_images", -1),
                         ("switch_fit_batches", 1.5)):
        with pytest.raises(ValueError, match=field):
            train(_cfg(shapes, tmp_path / field, **{field: value}))
        assert not (tmp_path / field / "last.pth").exists()


class _Numbers:
    """A map-style data set whose item i is (tensor [i], {"i": tensor i})."""

    def __len__(self):
        return 5

    def __getitem__(self, i):
        return torch.tensor([float(i)]), {"i": torch.tensor(i)}


def _ids(batches):
    return [[int(t["i"]) for t in targets] for _, targets in batches]


def test_sharded_batches_partition_the_sequence():
    whole = _ids(switch_fit.sample_batches(_Numbers(), batch_size=2, num_batches=7, seed=3))
    assert len(whole) == 7 and all(len(b) == 2 for b in whole)
    for world in (1, 2, 3, 8):
        shards = [_ids(switch_fit.sample_batches(_Numbers(), batch_size=2, num_batches=7, seed=3, shard=(r, world)))
                  for r in range(world)]
        assert [len(s) for s in shards] == [switch_fit.shard_size(7, (r, world)) for r in range(world)]
        assert sum(map(len, shards)) == 7
        for b in range(7):  # batch b is rank b % world's (b // world)-th
            assert shards[b % world][b // world] == whole[b]
    with pytest.raises(ValueError, match="shard"):
        next(switch_fit.sample_batches(_Numbers(), batch_size=2, num_batches=7, seed=3, shard=(2, 2)))


def test_the_fit_keeps_at_most_about_max_rois(shapes, fitted_run):
    _, result = fitted_run
    model, _ = model_from_checkpoint(result["checkpoint"])
    data = CocoDetection(*split_paths(shapes, "train"))
    kw = dict(target_gmacs=None, num_batches=3, batch_size=2, epochs=1, calibration_images=0, progress=False)
    whole = switch_fit.fit_model_switch(model, data, max_rois=None, **kw)
    assert whole.rois > 3
    capped = switch_fit.fit_model_switch(model, data, max_rois=3, **kw)  # 1 per batch
    assert capped.rois == 3
    with pytest.raises(ValueError, match="max_rois"):
        switch_fit.fit_model_switch(model, data, max_rois=0, **kw)

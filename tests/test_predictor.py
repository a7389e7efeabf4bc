"""The Predictor on a tiny random-weights DynaMask: its results equal the model's own output, every input
form and batch size gives the same results, COCO results load, and bad inputs fail naming what was wrong."""

import os
import subprocess
import sys

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from model_helpers import TINY, one_thread, pair_detections  # noqa: F401
from PIL import Image

from dynamask import Predictor
from dynamask.data.images import to_image_tensor
from dynamask.engine.checkpoint import build_model, make_arch, model_from_checkpoint, save_checkpoint

# Random weights score every class near 1/3; box_score_thresh=0 keeps the detections so there is something
# to compare. Category ids 10/20 (not 1/2) so that a label passed off as a category id shows.
ARCH = make_arch("dynamask_resnet_fpn", **TINY, box_score_thresh=0.0)
LABEL_MAP = {1: (10, "disc"), 2: (20, "square")}


def _image(seed: int, size=(96, 128)) -> np.ndarray:
    """``[H, W, 3]`` uint8: noise with a bright disc and a square, so boxes have something to find."""
    rng = np.random.default_rng(seed)
    h, w = size
    img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    img[(yy - h // 2) ** 2 + (xx - w // 3) ** 2 < (h // 4) ** 2] = (230, 40, 40)
    img[10:40, w - 50:w - 15] = (30, 220, 60)
    return img


def _cut_between(scores) -> float:
    """A score threshold halfway across the widest gap between two consecutive scores, with detections on
    both sides. A threshold equal to one of the scores would let float noise (batching pads images; another
    CPU sums in another order) decide on which side that detection falls."""
    s = sorted(float(x) for x in scores)
    assert len(s) >= 2, "need two scores to put a threshold between"
    gap, i = max((s[i + 1] - s[i], i) for i in range(len(s) - 1))
    assert gap > 1e-4, f"scores too close to separate from float noise: widest gap {gap:.2e}"
    return (s[i] + s[i + 1]) / 2


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("predictor")
    torch.manual_seed(0)
    path = str(root / "tiny.pth")
    save_checkpoint(path, arch=ARCH, label_map=LABEL_MAP, model=build_model(ARCH))
    return path


@pytest.fixture(scope="module")
def predictor(ckpt):
    return Predictor(ckpt, device="cpu", score_thresh=0.0, batch_size=1)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for i in range(3):
        Image.fromarray(_image(i)).save(root / f"img{i}.png")
    return root


def _same(a, b):
    assert a.image_size == b.image_size and len(a) == len(b)
    for name in ("boxes", "scores", "labels", "category_ids", "masks", "mask_resolution"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_path_equals_the_models_own_output(ckpt, predictor, image_dir):
    path = str(image_dir / "img0.png")
    r = predictor(path)
    model, _ = model_from_checkpoint(ckpt)
    pixels = np.array(Image.open(path).convert("RGB"))
    with torch.no_grad():
        out = model.eval()([torch.from_numpy(pixels).permute(2, 0, 1).float() / 255])[0]
    assert len(r) == len(out["scores"]) > 0
    assert r.image_size == (96, 128) and r.masks.shape == (len(r), 96, 128) and r.masks.dtype == torch.bool
    assert torch.equal(r.boxes, out["boxes"]) and torch.equal(r.scores, out["scores"])
    assert torch.equal(r.labels, out["labels"]) and torch.equal(r.mask_resolution, out["mask_resolution"])
    assert torch.equal(r.masks, out["masks"][:, 0] >= 0.5) and r.masks.any()
    assert r.category_ids.tolist() == [LABEL_MAP[int(k)][0] for k in out["labels"]]
    # to_coco: COCO category ids, xywh boxes, RLE masks that decode to the same pixels
    coco = r.to_coco(image_id=7)
    assert [d["category_id"] for d in coco] == r.category_ids.tolist() and coco[0]["image_id"] == 7
    x1, y1, x2, y2 = r.boxes[0].tolist()
    assert coco[0]["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
    assert coco[0]["mask_resolution"] == int(r.mask_resolution[0])
    decoded = mask_utils.decode({"size": coco[0]["segmentation"]["size"],
                                 "counts": coco[0]["segmentation"]["counts"].encode()})
    assert np.array_equal(decoded.astype(bool), r.masks[0].numpy())
    # the score threshold drops exactly the detections below it
    cut = _cut_between(r.scores)
    high = Predictor(ckpt, device="cpu", score_thresh=cut, batch_size=1)(path)
    assert torch.equal(high.scores, r.scores[r.scores >= cut]) and 0 < len(high) < len(r)


def test_every_input_form_gives_the_same_image(image_dir, tmp_path):
    rgb = _image(5)
    ref = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    Image.fromarray(rgb).save(tmp_path / "a.png")
    forms = [str(tmp_path / "a.png"), tmp_path / "a.png", Image.fromarray(rgb), rgb, rgb.astype(np.float64) / 255,
             torch.from_numpy(rgb).permute(2, 0, 1).contiguous(), ref.clone(),
             np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])]  # opaque RGBA
    for form in forms:
        assert torch.equal(to_image_tensor(form), ref), type(form)
    gray = rgb[:, :, 1]
    assert torch.equal(to_image_tensor(gray), to_image_tensor(np.dstack([gray] * 3)))
    assert torch.equal(to_image_tensor(gray[:, :, None]), to_image_tensor(np.dstack([gray] * 3)))
    # half-transparent RGBA: the array and the same pixels in a PNG file agree (alpha over black)
    rgba = np.dstack([rgb, np.linspace(0, 255, rgb.shape[1]).astype(np.uint8)[None].repeat(rgb.shape[0], 0)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    blended = to_image_tensor(rgba)
    assert torch.equal(blended, to_image_tensor(str(tmp_path / "rgba.png")))
    assert blended[:, :, 0].max() == 0 and torch.equal(blended[:, :, -1], ref[:, :, -1])


def test_input_forms_give_identical_results(predictor, image_dir):
    path = str(image_dir / "img1.png")
    rgb = np.asarray(Image.open(path))
    results = predictor([path, Image.open(path), rgb, torch.tensor(rgb).permute(2, 0, 1).contiguous()])
    assert len(results) == 4 and len(results[0]) > 0
    for r in results[1:]:
        _same(results[0], r)
    # a [B, 3, H, W] tensor is a batch: a list of results
    batch = torch.stack([to_image_tensor(rgb), to_image_tensor(rgb)])
    both = predictor(batch)
    assert isinstance(both, list) and len(both) == 2
    _same(both[0], results[0])


def test_batching_gives_the_same_results(ckpt, image_dir):
    paths = sorted(str(p) for p in image_dir.iterdir())
    one = Predictor(ckpt, device="cpu", score_thresh=0.0, batch_size=1)(paths)
    two = Predictor(ckpt, device="cpu", score_thresh=0.0, batch_size=2)(paths)  # a full batch, then one left
    three = Predictor(ckpt, device="cpu", score_thresh=0.0, batch_size=3)(paths)
    assert len(one) == len(two) == len(three) == 3
    for a, b in list(zip(one, two)) + list(zip(one, three)):
        # a batched convolution may sum in another order (float noise ~1e-5), which can swap two
        # near-equal scores: pair each detection with the same-label one nearest in box and score
        assert len(a) == len(b) > 0
        pairs = pair_detections(vars(a), vars(b))
        for i, j in enumerate(pairs):
            assert torch.allclose(a.boxes[i], b.boxes[j], atol=1e-3) and abs(a.scores[i] - b.scores[j]) < 1e-4
            assert a.mask_resolution[i] == b.mask_resolution[j] and a.category_ids[i] == b.category_ids[j]
            assert (a.masks[i] != b.masks[j]).float().mean() < 1e-3


def test_a_model_with_category_ids(ckpt, image_dir):
    model, _ = model_from_checkpoint(ckpt)
    path = str(image_dir / "img2.png")
    named = Predictor(model, device="cpu", score_thresh=0.0, cat_ids=[3, 9], category_names=["a", "b"])
    r = named(path)
    assert named.label_map == {1: (3, "a"), 2: (9, "b")}
    assert r.category_ids.tolist() == [{1: 3, 2: 9}[int(k)] for k in r.labels]
    plain = Predictor(model, device="cpu", score_thresh=0.0)(path)  # no ids known: label = category id
    assert torch.equal(plain.category_ids, plain.labels) and torch.equal(plain.boxes, r.boxes)
    assert {d["category_id"] for d in plain.to_coco(1)} == set(plain.labels.tolist())
    with pytest.raises(ValueError, match="2 entries but category_names has 1"):
        Predictor(model, cat_ids=[3, 9], category_names=["a"])
    with pytest.raises(ValueError, match="checkpoint carries its own label map"):
        Predictor(ckpt, cat_ids=[3, 9])
    with pytest.raises(ValueError, match="batch_size"):
        Predictor(model, batch_size=0)
    assert Predictor(model, device="cpu", amp=True).amp is False  # autocast only on CUDA


def test_bad_images_are_named(predictor, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ValueError, match=r"notes\.png: cannot read image"):
        predictor(str(text))
    with pytest.raises(FileNotFoundError, match=r"image not found: .*missing\.png"):
        predictor(str(tmp_path / "missing.png"))
    bad = [
        (np.zeros((8, 8, 2), np.uint8), "got shape \\(8, 8, 2\\)"),
        (np.zeros((2, 8, 8, 3, 1), np.uint8), "got shape"),
        (np.zeros((8, 8, 3), np.int32), "got dtype int32"),
        (np.full((8, 8, 3), 200.0), "must hold values in \\[0, 1\\]"),
        (torch.zeros(8, 8, 3), "must be \\[3, H, W\\], got shape \\(8, 8, 3\\)"),
        (torch.zeros(3, 8, 8, dtype=torch.int64), "got dtype torch.int64"),
        (torch.full((3, 8, 8), -0.5), "must hold values in \\[0, 1\\]"),
    ]
    for image, message in bad:
        with pytest.raises(ValueError, match=message):
            to_image_tensor(image)
    with pytest.raises(TypeError, match="got int"):
        to_image_tensor(3)


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nothing.pth"):
        Predictor(str(tmp_path / "nothing.pth"))
    other = str(tmp_path / "other_arch.pth")
    save_checkpoint(other, arch=make_arch("yolo_v8", depth=18), label_map=LABEL_MAP, model=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"other_arch\.pth: unknown architecture 'yolo_v8'"):
        Predictor(other)
    raw = str(tmp_path / "state_dict.pth")
    torch.save(torch.nn.Linear(2, 2).state_dict(), raw)
    with pytest.raises(ValueError, match=r"state_dict\.pth: not a dynamask checkpoint .*has \['bias', 'weight'\]"):
        Predictor(raw)
    wrong = str(tmp_path / "wrong_weights.pth")
    save_checkpoint(wrong, arch=ARCH, label_map=LABEL_MAP, model=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"wrong_weights\.pth: weights do not fit architecture"):
        Predictor(wrong)


def test_import_dynamask_stays_cheap():
    code = ("import sys, dynamask; heavy = [m for m in ('matplotlib', 'pycocotools', 'dynamask.predictor', "
            "'dynamask.models') if m in sys.modules]; assert not heavy, heavy; "
            "assert dynamask.Predictor.__module__ == 'dynamask.predictor'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


@pytest.fixture
def no_tf32():
    """cuDNN and cuBLAS use TF32 (10-bit mantissas) for float32 on sm_80+ by default: a float32 comparison
    with the CPU must turn it off, and give the process back its settings afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.cuda
def test_cuda_matches_cpu(ckpt, image_dir, no_tf32):
    paths = sorted(str(p) for p in image_dir.iterdir())
    cpu = Predictor(ckpt, device="cpu", score_thresh=0.0)(paths)  # the same files, decoded the same way
    for amp in (False, True):
        gpu = Predictor(ckpt, device="cuda", score_thresh=0.0, amp=amp)(paths)
        for a, b in zip(cpu, gpu):
            assert b.masks.device.type == "cpu" and b.masks.shape[1:] == a.masks.shape[1:]
            if not amp:  # float16 may reorder near-equal random scores; float32 must agree closely
                # float32 through ~20 layers on both devices, summed in other orders (and by other
                # convolution algorithms): relative errors of ~1e-5 per layer at most, ~1e-4 through the
                # network; scores are softmax probabilities in [0, 1], so 1e-3 has a 10x margin and
                # still catches a wrong box or class (differences of ~1e-1).
                assert len(a) == len(b)
                assert torch.allclose(a.scores, b.scores, atol=1e-3)


# --------------------------------------------------------------------------------------------- CLI
def test_cli_infer_writes_overlays_and_coco_results(ckpt, image_dir, tmp_path, capsys):
    import json

    from pycocotools.coco import COCO

    from dynamask.cli import main

    extra = tmp_path / "extra.jpg"
    Image.fromarray(_image(9, size=(80, 100))).save(extra)
    out = tmp_path / "out"
    assert main(["infer", str(image_dir), str(extra), "--weights", ckpt, "--out", str(out), "--score-thresh", "0.0",
                 "--batch-size", "2", "--device", "cpu", "--no-progress"]) == 0
    files = [str(image_dir / f"img{i}.png") for i in range(3)] + [str(extra)]  # folder sorted, then the file
    assert json.load(open(out / "images.json")) == {str(i): f for i, f in enumerate(files, start=1)}
    assert "4 images" in capsys.readouterr().out
    for name, size in (("img0", (128, 96)), ("img1", (128, 96)), ("img2", (128, 96)), ("extra", (100, 80))):
        with Image.open(out / f"{name}.png") as overlay:  # at the image's own size
            assert overlay.format == "PNG" and overlay.size == size
    results = json.load(open(out / "results.json"))
    # the same dicts as the Python API gives, numbered in the order processed
    api = Predictor(ckpt, device="cpu", score_thresh=0.0)(files)
    expected = [d for i, r in enumerate(api, start=1) for d in r.to_coco(i)]
    assert len(results) == len(expected) > 0
    for got, want in zip(results, expected):
        assert got["image_id"] == want["image_id"] and got["category_id"] == want["category_id"]
        assert got["segmentation"] == want["segmentation"] and got["mask_resolution"] == want["mask_resolution"]
        assert got["bbox"] == pytest.approx(want["bbox"], abs=1e-3) and got["score"] == pytest.approx(want["score"])
    assert {r["category_id"] for r in results} <= {10, 20}
    # loads into pycocotools against a ground-truth file of the same images
    sizes = [(96, 128)] * 3 + [(80, 100)]
    gt = COCO()
    gt.dataset = {"images": [{"id": i, "file_name": f, "height": h, "width": w}
                             for i, (f, (h, w)) in enumerate(zip(files, sizes), start=1)],
                  "annotations": [], "categories": [{"id": c, "name": n} for c, n in LABEL_MAP.values()]}
    gt.createIndex()
    dt = gt.loadRes(str(out / "results.json"))
    assert len(dt.anns) == len(results)
    ann = dt.anns[1]
    assert dt.annToMask(ann).shape == sizes[ann["image_id"] - 1]
    # a higher threshold keeps only the scores above it, and loses none of them: the same images in the same
    # batches (so the same arithmetic), and a threshold well away from every score
    cut = _cut_between(r["score"] for r in results)
    # (the checkpoint named first, as eval and fit-switch take it: the same run as with --weights)
    assert main(["infer", ckpt, str(image_dir), str(extra), "--out", str(tmp_path / "high"),
                 "--score-thresh", str(cut), "--batch-size", "2", "--device", "cpu", "--no-progress"]) == 0
    high = json.load(open(tmp_path / "high" / "results.json"))
    kept = [r for r in results if r["score"] >= cut]
    assert 0 < len(high) == len(kept) < len(results)
    for got, want in zip(high, kept):
        assert got["image_id"] == want["image_id"] and got["score"] == pytest.approx(want["score"])
        assert got["segmentation"] == want["segmentation"]


def test_cli_infer_errors_name_the_file(ckpt, image_dir, tmp_path, capsys):
    from dynamask.cli import main

    def run(*args):
        return main(["infer", *args, "--out", str(tmp_path / "o"), "--no-progress"])

    text = tmp_path / "readme.txt"
    text.write_text("hello")
    assert run(str(text), "--weights", ckpt) == 1
    assert "readme.txt: cannot read image" in capsys.readouterr().err
    assert run(str(tmp_path / "gone.png"), "--weights", ckpt) == 1
    err = capsys.readouterr().err
    assert "image not found" in err and "gone.png" in err
    assert run(str(image_dir), "--weights", str(tmp_path / "none.pth")) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    other = str(tmp_path / "mrcnn_like.pth")
    save_checkpoint(other, arch=make_arch("detr_r50"), label_map=LABEL_MAP, model=torch.nn.Linear(2, 2))
    assert run(str(image_dir), "--weights", other) == 1
    assert "mrcnn_like.pth: unknown architecture 'detr_r50'" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as exc:
        run(str(empty), "--weights", ckpt)
    assert exc.value.code == 2 and "empty: no image files" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # overlays would overwrite the inputs
        main(["infer", str(image_dir), "--weights", ckpt, "--out", str(image_dir), "--no-progress"])
    assert exc.value.code == 2 and "would overwrite the input" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        run(str(image_dir), "--weights", ckpt, "--batch-size", "0")
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:  # a checkpoint is required: first, or as --weights
        run(str(image_dir))
    assert exc.value.code == 2 and "not a checkpoint: name the checkpoint first" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        run(ckpt)
    assert exc.value.code == 2 and "give the checkpoint, then the images" in capsys.readouterr().err

"""Training on CPU: loss keys, gradients, empty images, and overfitting a tiny fixed set."""

import math

import pytest
import torch
from model_helpers import one_thread, synthetic_batch, tiny_model  # noqa: F401


def _grad_norm(module):
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_pretrain_step():
    torch.manual_seed(0)
    model = tiny_model().train()
    images, targets = synthetic_batch()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "loss_mask",
                           "loss_edge"}
    assert all(math.isfinite(float(v.detach())) for v in losses.values())
    sum(losses.values()).backward()
    assert _grad_norm(model.roi_heads.mask_head.fam) > 0
    assert _grad_norm(model.roi_heads.mask_head.edge_predictors) > 0
    assert _grad_norm(model.roi_heads.msm) == 0  # MSM unused in pretraining


def test_dynamic_step_trains_the_msm_only_through_routing_losses():
    torch.manual_seed(0)
    model = tiny_model(target_gmacs=1e-4, budget_weight=0.4).train()
    model.mask_training = "dynamic"
    images, targets = synthetic_batch()
    losses = model(images, targets)
    assert {"loss_mask", "loss_edge", "loss_budget", "loss_entropy"} <= set(losses)
    assert losses["loss_budget"] > 0  # every resolution costs more than 1e-4 GMAC
    assert losses["loss_entropy"] <= 0
    sum(losses.values()).backward()
    assert _grad_norm(model.roi_heads.msm) > 0
    # the MSM reads a detached RoI feature: the routing losses alone leave the backbone untouched
    model.zero_grad()
    losses = model(images, targets)
    (losses["loss_budget"] + losses["loss_entropy"]).backward()
    assert _grad_norm(model.roi_heads.msm) > 0
    assert _grad_norm(model.backbone) == 0


def test_training_image_with_no_objects():
    torch.manual_seed(0)
    model = tiny_model().train()
    images = [torch.rand(3, 64, 80)]
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "masks": torch.zeros(0, 64, 80, dtype=torch.uint8)}]
    for mode in ("pretrain", "dynamic"):
        model.mask_training = mode
        model.zero_grad()
        losses = model(images, targets)
        assert losses["loss_mask"] == 0 and losses["loss_edge"] == 0
        sum(losses.values()).backward()
        assert all(math.isfinite(float(v.detach())) for v in losses.values())


@pytest.mark.slow
def test_total_loss_halves_on_a_tiny_fixed_set():
    """The total loss, measured before and after training with the same three seeds (so the same random
    proposal sampling), at least halves in 60 steps on one image.

    The per-step training losses are a poor measure: on one image they jump by ±40% from step to step
    (box regression grows as proposals become positives, and the sampled RoIs change), so a mean of the
    last three steps crossed the bar or not depending on float differences of 1e-6 in any kernel (it
    did when the CPU kernels started running multi-threaded). Measured here: 2.61 → 0.82 and
    3.15 → 0.74 after 60 steps for two model seeds.

    The model is pinned to the paper's stage levels (P4, P3, P2), with which those figures were measured: on
    its 64-px images the default now fuses P2 at every stage, which moves this one-image trajectory (its
    classifier loss after 60 steps is the noisy term: 0.18 or 0.81 depending on the CPU's instruction set,
    against 0.19 and 0.27 with the paper's levels), while the mask loss falls alike (0.66 → 0.26-0.27 against
    0.67 → 0.21-0.25)."""
    torch.manual_seed(0)
    model = tiny_model(stage_levels=(2, 1, 0)).train()
    images, targets = synthetic_batch()
    images, targets = images[:1], targets[:1]  # one image, two objects: a CPU-second per step
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=2e-4)

    def mean_loss() -> float:
        rng = torch.get_rng_state()
        values = []
        with torch.no_grad():
            for seed in (101, 102, 103):
                torch.manual_seed(seed)
                values.append(float(sum(model(images, targets).values())))
        torch.set_rng_state(rng)
        return sum(values) / len(values)

    before = mean_loss()
    for _ in range(60):
        losses = model(images, targets)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
    after = mean_loss()
    assert after < 0.5 * before, (before, after)


def test_mask_rois_per_image_caps_the_mask_branch(monkeypatch):
    """With the cap, the mask head sees at most cap positives per image, a subset of all positives."""
    torch.manual_seed(0)
    model = tiny_model(box_batch_size_per_image=64).train()
    heads = model.roi_heads
    seen = []
    original = heads.mask_losses

    def spy(features, proposals, matched_idxs, image_shapes, targets, labels=None):
        seen.append([p.clone() for p in proposals])
        assert labels is not None and labels.shape == (sum(len(p) for p in proposals),)  # one label per RoI
        return original(features, proposals, matched_idxs, image_shapes, targets, labels)

    monkeypatch.setattr(heads, "mask_losses", spy)
    images, targets = synthetic_batch()
    for cap in (None, 2):
        heads.mask_rois_per_image = cap
        torch.manual_seed(1)  # the same proposals and samples for both runs
        sum(model(images, targets).values()).backward()
    full, capped = seen
    assert any(len(p) > 2 for p in full)  # the cap has something to cut
    for f, c in zip(full, capped):
        assert len(c) == min(2, len(f))
        assert all((f == row).all(1).any() for row in c)  # a subset of the positives
    with pytest.raises(ValueError, match="mask_rois_per_image"):
        tiny_model(mask_rois_per_image=0)


def _gumbel_input_dtypes(monkeypatch) -> list[torch.dtype]:
    """The dtype of each logits tensor the model passes to Gumbel-softmax, appended as it is called."""
    from dynamask.models import mask_losses

    seen: list[torch.dtype] = []
    original = mask_losses.gumbel_hard

    def recording(logits: torch.Tensor, tau: float) -> torch.Tensor:
        seen.append(logits.dtype)
        return original(logits, tau)

    monkeypatch.setattr(mask_losses, "gumbel_hard", recording)
    return seen


def test_one_training_step_under_cpu_autocast_bf16(monkeypatch):
    """Under autocast the MSM's logits reach Gumbel-softmax and every mask-branch loss in float32 (in
    bfloat16 the Gumbel noise and the entropy's logs are coarse), and the step's gradients are finite."""
    torch.manual_seed(0)
    model = tiny_model(target_gmacs=1e-3).train()
    model.mask_training = "dynamic"
    seen = _gumbel_input_dtypes(monkeypatch)
    images, targets = synthetic_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
    assert seen == [torch.float32]
    for key in ("loss_mask", "loss_edge", "loss_entropy", "loss_budget"):
        assert losses[key].dtype == torch.float32, key
    assert all(math.isfinite(float(v.detach())) for v in losses.values())
    sum(losses.values()).backward()
    assert _grad_norm(model.roi_heads.msm) > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_gradients_get_their_parameters_layout():
    """A 1×1 conv weight ``[O, I, 1, 1]`` can get a channels-last gradient (as from a conv fed
    channels-last input): strides of size-1 dims differ, autograd keeps it, and DDP would copy it stride by
    stride into its bucket each step. The hooks give it the parameter's strides, values unchanged."""
    from dynamask.engine.distributed import match_grad_layouts

    weight = torch.nn.Parameter(torch.rand(4, 8, 1, 1))
    bias = torch.nn.Parameter(torch.rand(4))
    module = torch.nn.Module()
    module.weight, module.bias = weight, bias
    upstream = torch.empty_strided((4, 8, 1, 1), (8, 1, 8, 8)).copy_(torch.rand(4, 8, 1, 1))  # channels-last

    def step():
        module.zero_grad(set_to_none=True)
        ((weight * upstream).sum() + bias.sum()).backward()
        return weight.grad

    assert step().stride() == upstream.stride() != weight.stride()  # what the hooks are for
    handles = match_grad_layouts(module)
    assert len(handles) == 1  # the bias has no size-1 dimension: autograd already copies it when needed
    grad = step()
    assert grad.stride() == weight.stride() and torch.equal(grad, upstream)


@pytest.mark.cuda
def test_one_training_step_under_cuda_amp(monkeypatch):
    """CUDA mixed precision (float16, with a gradient scaler, as the trainer runs it): the MSM's logits
    and the mask-branch losses are float32, and the unscaled gradients are finite."""
    torch.manual_seed(0)
    model = tiny_model(target_gmacs=1e-3).cuda().train()
    model.mask_training = "dynamic"
    seen = _gumbel_input_dtypes(monkeypatch)
    images, targets = synthetic_batch()
    images = [im.cuda() for im in images]
    targets = [{k: v.cuda() for k, v in t.items()} for t in targets]
    scaler = torch.amp.GradScaler("cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        losses = model(images, targets)
    assert seen == [torch.float32]
    for key in ("loss_mask", "loss_edge", "loss_entropy", "loss_budget"):
        assert losses[key].dtype == torch.float32, key
    scaler.scale(sum(losses.values())).backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler.unscale_(opt)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

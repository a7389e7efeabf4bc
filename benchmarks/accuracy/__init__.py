"""Accuracy per FLOP on shapes whose objects are large enough for mask resolution to matter (issue 16).

    python -m benchmarks.accuracy --split --out /tmp/accuracy    # one seed (≈ 85 min on 2 cores: docs/results.md)
    python -m benchmarks.accuracy --quick --out /tmp/acc-quick   # smoke test (CI), about a minute

(from the repository root, or with it on ``PYTHONPATH``). What it trains (one seed, one data set; every row
evaluated on the same validation split):

1. ``pretrain``: DynaMask with every resolution supervised (no switch), ``pretrain_iters`` iterations.
2. ``base``: the pretrain continued for ``phase_iters`` at the lower learning rate (every resolution still
   supervised). Rows on it: every fixed resolution (Tab. 1/7), the size rule (Eq. 8, Tab. 8), the
   oracle (per detection the cheapest resolution within 0.01 IoU of the best: the ceiling).
3. ``switches``: switches trained on the frozen ``base`` model (decoupled: the stages keep their own
   supervision; each switch learns from detached per-resolution losses), all at once on the same
   batches, for ``switch_iters``: the routing signal (paper / common grid / boundary band), what the switch
   reads (RoI feature / trunk output), the budget C_t, the Gumbel temperature, the budget weight.
3b. ``fit``: the library's switch fit (:mod:`dynamask.engine.switch_fit`, as ``dynamask fit-switch`` runs it) on
   the frozen ``base`` model: ``FitPlan.batches`` training batches collected once, a regression switch fitted per
   init, priced at each budget on the detections of ``FitPlan.calibration_images`` training images.
4. ``coupled``: the paper's dynamic phase (Eq. 3: the switch's Gumbel choice selects the supervised
   resolution) from the pretrain, ``phase_iters``, at each budget C_t (Tab. 5), and variants.
5. ``maskrcnn``: torchvision's Mask R-CNN head (28², class-specific) on the same backbone, trained with the
   same recipe for ``pretrain_iters + phase_iters`` (Tab. 2/6).

Every row reports segm AP/AP50/AP75, Boundary AP, the mask-head GMAC per instance over all detections the
head runs on (switch included), the per-category share of each resolution and, for switch rows, the routing
value on the ground-truth boxes (:mod:`dynamask.engine.routing_value`). The study is resumable: a trained phase
is a checkpoint, a finished row a JSON file in ``OUT/rows``; a rerun skips both. The report
(``accuracy_cpu.md``/``.json`` and two PNGs) is rewritten after every row, so a partial run has one.

The modules: :mod:`.config` (what the study trains: :class:`~.config.StudyConfig` and its variants),
:mod:`.phases` (the training phases, data, models and frozen-model switches), :mod:`.rows` (the rows of each
phase's model), :mod:`.study` (:class:`~.study.Study`: the resumable study folder), :mod:`.evaluate` (the
policies' metrics on one model's detections), :mod:`.report` (``accuracy_cpu.md``/``.json`` and the plots),
:mod:`.grid` (the picture grid) and :mod:`.__main__` (the command line).
"""

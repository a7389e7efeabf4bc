"""The switch fit's defaults: one place for :func:`dynamask.engine.switch_fit.fit_model_switch`, ``dynamask train``
(:class:`~dynamask.engine.train_config.TrainConfig`), ``dynamask fit-switch`` and the accuracy study. No imports,
so that a command line's help and the study's configuration read them without loading a model."""

# training batches the fit runs the trained model on: three times the 900 of before, because the share of the
# routing gain the switch captured rose with the RoIs it learned from (issue 32; docs/method.md §3, "How many RoIs
# the fit learns from")
BATCHES = 2700
# epochs of the switch over the collected RoIs (its weights averaged over the last half)
EPOCHS = 15
# training images on whose detections the fitted switch's price is set
CALIBRATION_IMAGES = 200

"""Training, evaluation and checkpoints. Import the submodules: ``dynamask.engine.evaluate``,
``dynamask.engine.checkpoint``, ``dynamask.engine.train``."""

# The two set-up commands of the README. Each creates .venv if needed (pinned torch), builds the kernels.
.PHONY: demo test setup bench lint

setup:
	bash scripts/setup_env.sh

# The main job.
demo:
	bash scripts/demo.sh

test: setup
	bash scripts/test.sh

# ruff and mypy (pyproject.toml); the kernels are not needed, only .venv with requirements.txt.
lint:
	bash scripts/lint.sh

bench: setup
	.venv/bin/python benchmarks/roi_align.py

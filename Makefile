# The two set-up commands of the README. Each creates .venv if needed (pinned torch), builds the kernels.
.PHONY: demo test setup bench

setup:
	bash scripts/setup_env.sh

# The main job.
demo:
	bash scripts/demo.sh

test: setup
	bash scripts/test.sh

bench: setup
	.venv/bin/python benchmarks/roi_align.py

# Two commands on a fresh machine: `make demo` (the main job on a built-in default: train a small
# LASADGen on digits on the CPU, then sample a class-conditional grid to runs/demo/samples.png) and
# `make test` (the test suite, which .ci/run runs). Each creates .venv and installs if needed.
.PHONY: demo test venv

venv:
	@bash scripts/bootstrap.sh

demo: venv
	.venv/bin/python train.py --config configs/digits.py --workdir runs/demo

test: venv
	.venv/bin/python -m pytest -q tests

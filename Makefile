# Two commands on a fresh machine: `make demo` (the main job on a built-in default: train a small
# LASADGen on digits on the CPU, then sample a class-conditional grid to runs/demo/samples.png) and
# `make test` (the test suite, which .ci/run runs). Each creates .venv and installs if needed.
.PHONY: demo lina-demo test venv

venv:
	@bash scripts/bootstrap.sh

demo: venv
	.venv/bin/python train.py --config configs/digits.py --workdir runs/demo

lina-demo: venv   # LINA (masked AR + flow matching) on digits as continuous tokens, ~5-7 min CPU
	.venv/bin/python train.py --config configs/lina_digits.py --workdir runs/lina_demo

test: venv
	.venv/bin/python -m pytest -q tests

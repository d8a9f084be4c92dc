# Two commands on a fresh machine: `make demo` (the main job on a built-in default) and
# `make test` (the test suite, which .ci/run runs). Each creates .venv and installs if needed.
.PHONY: demo test venv

venv:
	@bash scripts/bootstrap.sh

demo: venv
	.venv/bin/python -m lasad_jax.demo

test: venv
	.venv/bin/python -m pytest -q tests

# onnxgrad's front door. `make demo` and `make test` work on a fresh clone: the first run makes the
# virtual environment .venv with `python3 -m venv` and installs the package into it (editable); later
# runs reuse it until pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LINT_PATHS = $(wildcard onnxgrad cli tests models bench)

.PHONY: demo test fuzz lint models clean distclean

demo: $(VENV)/.installed
	$(BIN)/onnxgrad grad models/mlp.onnx -o build/mlp_grad.onnx --ys loss --xs W1 --xs b1 --xs W2 --xs b2 --xs x
	$(BIN)/onnxgrad run build/mlp_grad.onnx --seed 0

test: $(VENV)/.installed-test
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/python -m pytest -q tests

# the long generated-graph run (tests/test_fuzz.py's 'long' hypothesis profile: 20,000 graphs)
fuzz: $(VENV)/.installed-test
	ONNXGRAD_FUZZ_PROFILE=long $(BIN)/python -m pytest -q tests/test_fuzz.py --hypothesis-show-statistics

lint: $(VENV)/.installed-test
	$(BIN)/ruff check $(LINT_PATHS)

# rebuild the bundled sample models (deterministic: the same bytes each time)
models: $(VENV)/.installed
	$(BIN)/python models/build_models.py

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch and tensorflow-cpu are pinned (==) in pyproject.toml, so pip never picks another build
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

clean:
	rm -rf build .pytest_cache .ruff_cache .hypothesis onnxgrad.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

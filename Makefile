# sg-train: `make demo` trains the embedded default, `make test` runs the test suite.
# Both create .venv and install the project into it on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.sg-train-installed
DATA   ?= data/synthetic

export HF_HUB_OFFLINE ?= 1
export NO_ALBUMENTATIONS_UPDATE ?= 1

.PHONY: install demo test test-all data clean-demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

$(DATA)/.complete: | $(STAMP)
	$(PY) -m sg_train.synthetic --out $(DATA)

data: $(DATA)/.complete

# A new run folder each time: runs/demo, then runs/demo-2, runs/demo-3, ... (a run folder is never reused).
demo: $(STAMP) $(DATA)/.complete
	@run=runs/demo; n=1; while [ -e "$$run" ]; do n=$$((n + 1)); run=runs/demo-$$n; done; \
	echo "run folder: $$run"; \
	WANDB_MODE=offline $(PY) train.py fit --config configs/demo.yaml --trainer.default_root_dir "$$run"

test: $(STAMP)
	$(PY) -m pytest

test-all: $(STAMP)
	$(PY) -m pytest -m ""

clean-demo:
	rm -rf runs/demo runs/demo-*

# The two commands of the README:
#   make demo   sets up the runtime (base install, no torch) and runs the main job on the embedded default
#   make test   sets up the development environment and runs lint and the tests
PYTHON ?= python3
RUN_VENV := .venv-run
DEV_VENV := .venv
DEMO_INPUT ?= ../shared/datasets/magnetic_tile/MT_Crack/Imgs
DEMO_OUT ?= out/demo
REFERENCE := .cache/reference/mobilesam

.PHONY: demo test lint bench default-bundle clean

# The runtime as a line box gets it: engines + service, no torch.
$(RUN_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(RUN_VENV)
	$(RUN_VENV)/bin/pip install -q --upgrade pip
	$(RUN_VENV)/bin/pip install -q -e .
	touch $@

# Everything: runtime + training (torch 2.13.0, pinned: see README) + test tools.
$(DEV_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(DEV_VENV)
	$(DEV_VENV)/bin/pip install -q --upgrade pip
	$(DEV_VENV)/bin/pip install -q torch==2.13.0
	$(DEV_VENV)/bin/pip install -q -e '.[train,dev,basler]'
	touch $@

demo: $(RUN_VENV)/.installed
	$(RUN_VENV)/bin/defectsam bundle inspect
	$(RUN_VENV)/bin/defectsam infer $(DEMO_INPUT) --glob '*.jpg' --limit 8 --out $(DEMO_OUT)

test: $(DEV_VENV)/.installed lint
	$(DEV_VENV)/bin/python -m pytest -q

lint: $(DEV_VENV)/.installed
	$(DEV_VENV)/bin/ruff check .
	$(DEV_VENV)/bin/mypy engines service training

# Engine-only benchmark: the default bundle against the mobilesam reference (random weights), one run.
bench: $(DEV_VENV)/.installed
	test -f $(REFERENCE)/manifest.json || $(DEV_VENV)/bin/defectsam-train export --arch mobilesam --random-init --out $(REFERENCE)
	$(DEV_VENV)/bin/defectsam bench engine --reference $(REFERENCE) --json out/bench/engine.json

# Re-export the embedded default bundle (untrained stand-in until the training issue lands).
default-bundle: $(DEV_VENV)/.installed
	$(DEV_VENV)/bin/defectsam-train export --arch student_cnn --random-init --seed 0 \
		--name defectsam-student-cnn-untrained --out engines/default

clean:
	rm -rf $(RUN_VENV) $(DEV_VENV) out .pytest_cache .mypy_cache .ruff_cache

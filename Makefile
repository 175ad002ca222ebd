# The two commands of the README:
#   make demo   sets up the runtime (base install, no torch) and starts the daemon on the synthetic camera
#               with the embedded default bundle; the live page is at http://127.0.0.1:8080/
#   make test   sets up the development environment and runs lint and the tests
# make peers installs the Debian programs the integration tests talk to or check deploy/ with
# (prometheus's promtool, shellcheck, mosquitto; root; CI runs it).
PYTHON ?= python3
RUN_VENV := .venv-run
DEV_VENV := .venv
DEMO_INPUT ?= out/demo/frames
DEMO_OUT ?= out/demo

DEMO_PORT ?= 8080
DEMO_PLC_PORT ?= 5020
PEERS := prometheus chromium mbpoll shellcheck mosquitto mosquitto-clients

.PHONY: demo demo-screenshot demo-infer test test-fast lint peers deploy-check bench bench-report default-bundle train-quickstart \
	clean

# The runtime as a line box gets it: engines + service, no torch.
$(RUN_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(RUN_VENV)
	$(RUN_VENV)/bin/pip install -q --upgrade pip
	$(RUN_VENV)/bin/pip install -q -e .
	touch $@

# Everything: runtime + training (torch 2.13.0, pinned: see README) + TensorBoard + test tools.
$(DEV_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(DEV_VENV)
	$(DEV_VENV)/bin/pip install -q --upgrade pip
	$(DEV_VENV)/bin/pip install -q torch==2.13.0
	$(DEV_VENV)/bin/pip install -q -e '.[train,dev,basler,tensorboard,mqtt,opcua]'
	touch $@

demo: $(RUN_VENV)/.installed
	DEFECTSAM__STORE__PATH=$(DEMO_OUT)/store DEFECTSAM__API__HOST=127.0.0.1 DEFECTSAM__API__PORT=$(DEMO_PORT) \
		DEFECTSAM__PLC__HOST=127.0.0.1 DEFECTSAM__PLC__PORT=$(DEMO_PLC_PORT) \
		$(RUN_VENV)/bin/defectsam serve

# The demo daemon in the background, then headless Chromium's screenshot of its live page:
# $(DEMO_OUT)/live-page.png (what an operator sees after about 10 s of watching).
CHROMIUM ?= $(shell command -v chromium || command -v chromium-browser || command -v google-chrome)
demo-screenshot: $(RUN_VENV)/.installed
	@test -n "$(CHROMIUM)" || { echo "chromium not found (make peers)"; exit 2; }
	@mkdir -p $(DEMO_OUT)
	@DEFECTSAM__STORE__PATH=$(DEMO_OUT)/store DEFECTSAM__API__HOST=127.0.0.1 DEFECTSAM__API__PORT=$(DEMO_PORT) \
		DEFECTSAM__PLC__HOST=127.0.0.1 DEFECTSAM__PLC__PORT=$(DEMO_PLC_PORT) \
		$(RUN_VENV)/bin/defectsam serve > $(DEMO_OUT)/serve.log 2>&1 & pid=$$!; \
	for i in $$(seq 180); do $(RUN_VENV)/bin/python -c "import urllib.request as u; \
		u.urlopen('http://127.0.0.1:$(DEMO_PORT)/readyz', timeout=2)" 2>/dev/null && break; sleep 1; done; \
	$(CHROMIUM) --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
		--disable-sync --no-first-run --user-data-dir=$$(mktemp -d) --window-size=1280,900 --timeout=10000 \
		--screenshot=$(abspath $(DEMO_OUT))/live-page.png http://127.0.0.1:$(DEMO_PORT)/ 2>/dev/null; \
	kill $$pid; wait $$pid; echo "screenshot: $(DEMO_OUT)/live-page.png"

# The one-shot job: inspect sample 4 MP frames (rendered synthetic panels), an overlay PNG and a JSON per frame
# into out/demo/infer.
demo-infer: $(RUN_VENV)/.installed
	$(RUN_VENV)/bin/defectsam bundle inspect
	$(RUN_VENV)/bin/python -c "import cv2, pathlib; from engines.synthetic import render_frame; \
		d = pathlib.Path('$(DEMO_INPUT)'); d.mkdir(parents=True, exist_ok=True); \
		[cv2.imwrite(str(d / f'panel-{s}.png'), render_frame(s, with_masks=False).image) for s in range(2000000, 2000008)]"
	$(RUN_VENV)/bin/defectsam infer $(DEMO_INPUT) --glob '*.png' --limit 8 --out $(DEMO_OUT)/infer

# Real peers of the integration tests; without them those tests skip and say why.
peers:
	@missing=$$(for p in $(PEERS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ]; then echo "peers present: $(PEERS)"; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	else echo "not root: install $$missing yourself (sudo apt-get install $$missing); their tests skip"; fi

# The Prometheus files of deploy/ through Debian's promtool (tests/test_deploy.py runs these too, and more).
deploy-check:
	promtool check config deploy/prometheus/prometheus.yml
	promtool check rules deploy/prometheus/defectsam.rules.yml
	promtool test rules deploy/prometheus/tests/defectsam.rules.test.yml

test: $(DEV_VENV)/.installed lint
	$(DEV_VENV)/bin/python -m pytest -q

# The edit loop: lint and the tests not marked slow (no daemons, exports, training); CI runs the full `make test`.
test-fast: $(DEV_VENV)/.installed lint
	$(DEV_VENV)/bin/python -m pytest -q -m "not slow"

lint: $(DEV_VENV)/.installed
	$(DEV_VENV)/bin/ruff check .
	$(DEV_VENV)/bin/mypy engines service training

# Benchmarks (docs/benchmarks.md). The SAM 2 teacher's reference graph is a random-weight export (it times as
# trained weights do) under .cache/bench, remade when its export code changes.
BENCH_CACHE := .cache/bench
# e.g. make bench-report BENCH_REPORT_FLAGS='--duration 600 --rounds 10'
BENCH_REPORT_FLAGS ?=

$(BENCH_CACHE)/sam2_small/reference.json: training/export/reference.py training/teachers/sam2.py | $(DEV_VENV)/.installed
	$(DEV_VENV)/bin/defectsam-train export-reference --arch sam2_small --out $(@D)

# Engine-only: the default bundle (FP32 and INT8), the whole inspection of 4 MP frames, windows and full tiling.
bench: $(DEV_VENV)/.installed
	$(DEV_VENV)/bin/defectsam bench engine --modes windows,tiles --json out/bench/engine.json

# Everything in one run (about 15 minutes on 2 cores): the inspection designs against the SAM 2 teacher, the daemon
# on 2688x1520 frames with its PLC latency, what each window costs; writes docs/benchmarks.md and
# out/bench/report.json. Run it on a quiet machine.
bench-report: $(DEV_VENV)/.installed $(BENCH_CACHE)/sam2_small/reference.json
	$(DEV_VENV)/bin/defectsam bench report --teacher $(BENCH_CACHE)/sam2_small \
		--json out/bench/report.json --markdown docs/benchmarks.md $(BENCH_REPORT_FLAGS)

# Train, export, calibrate, evaluate and quantize the embedded default bundle: synthetic data only
# (licence-clean): the window segmenter and the finder in two stages on 1500 + 1500 rendered 4 MP frames (rendered once into
# .cache/data), then the segmenter's third stage on hard negatives mined with the stage-2 bundle, about 5 hours on 2 CPU
# cores; docs/training.md has the figures.
SYNTH_VAL := synthetic,n=100,seed=1000000,defect_free_prob=0.3
SCORE_SWEEP := 0.5,0.7,0.8,0.9,0.95,0.97,0.98,0.99,0.995
SYNTH_TEST := synthetic,n=200,seed=2000000
default-bundle: $(DEV_VENV)/.installed
	$(DEV_VENV)/bin/defectsam-train train --config training/configs/default_synthetic.yaml
	$(DEV_VENV)/bin/defectsam-train train --config training/configs/default_synthetic_more.yaml
	$(DEV_VENV)/bin/defectsam-train train --config training/configs/default_finder.yaml
	$(DEV_VENV)/bin/defectsam-train train --config training/configs/default_finder_more.yaml
	$(DEV_VENV)/bin/defectsam-train export --checkpoint runs/default_synthetic_more/best.pt \
		--finder runs/default_finder_more/best.pt --name defectsam-synthetic --out runs/bundles/default-stage2
	$(DEV_VENV)/bin/defectsam-train calibrate runs/bundles/default-stage2 --data $(SYNTH_VAL) --thresholds $(SCORE_SWEEP)
	$(DEV_VENV)/bin/defectsam-train train --config training/configs/default_synthetic_mined.yaml
	$(DEV_VENV)/bin/defectsam-train export --checkpoint runs/default_synthetic_mined/best.pt \
		--finder runs/default_finder_more/best.pt --name defectsam-synthetic --out engines/default
	$(DEV_VENV)/bin/defectsam-train calibrate engines/default --data $(SYNTH_VAL) --thresholds $(SCORE_SWEEP)
	$(DEV_VENV)/bin/defectsam-train quantize engines/default --calib synthetic --n 16
	$(DEV_VENV)/bin/defectsam-train eval --bundle engines/default --precision fp32 --record synthetic_test \
		--data $(SYNTH_TEST)
	$(DEV_VENV)/bin/defectsam-train eval --bundle engines/default --precision int8 --record synthetic_test_int8 \
		--data $(SYNTH_TEST)

# The worked example of docs/training.md: synthetic data to a bundle on a CPU in minutes.
train-quickstart: $(DEV_VENV)/.installed
	$(DEV_VENV)/bin/defectsam-train train --config training/configs/quickstart.yaml
	$(DEV_VENV)/bin/defectsam-train train --config training/configs/quickstart_finder.yaml
	$(DEV_VENV)/bin/defectsam-train export --checkpoint runs/quickstart/best.pt --finder runs/quickstart-finder/best.pt \
		--name quickstart --out runs/quickstart-bundle

# The reference run (docs/reference.md): the field report's table on NEU-Seg (../shared/datasets) with this project's own
# teacher, students, INT8 and benchmark; reduced schedule, about 4.5 hours on 2 CPU cores (estimated). Resumable: run it again
# after an interruption (--fresh in REFERENCE_FLAGS redoes everything). On a GPU box:
#   make reference REFERENCE_CONFIG=training/configs/reference/full.yaml REFERENCE_OUT=reports/reference-full
REFERENCE_CONFIG ?= training/configs/reference/reduced.yaml
REFERENCE_OUT ?= reports/reference
REFERENCE_FLAGS ?=
.PHONY: reference
reference: $(DEV_VENV)/.installed
	$(DEV_VENV)/bin/defectsam-train reference --config $(REFERENCE_CONFIG) --out $(REFERENCE_OUT) $(REFERENCE_FLAGS)

clean:
	rm -rf $(RUN_VENV) $(DEV_VENV) out .pytest_cache .mypy_cache .ruff_cache

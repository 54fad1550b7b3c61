# Gannet: `make run` to try it, `make test` to check it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= gannet.toml

.PHONY: run test lint install clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

install: $(VENV)/.installed

# A ready example: config in ./gannet.toml (copied from the package example if
# missing), a self-signed certificate and one account, alice@example.test with
# the password "alice-password". Listeners: 2525 (mx), 2587 (submission), 2465 (submissions).
run: install
	test -f $(CONFIG) || cp gannet/examples/gannet.toml $(CONFIG)
	mkdir -p var/tls
	test -f var/tls/cert.pem || openssl req -x509 -newkey rsa:2048 -nodes -days 365 \
	    -subj /CN=mx.example.test -addext subjectAltName=DNS:mx.example.test,DNS:localhost,IP:127.0.0.1 \
	    -keyout var/tls/key.pem -out var/tls/cert.pem 2>/dev/null
	test -f var/users || echo alice-password | $(PY) -m gannet users add alice@example.test --password-stdin --config $(CONFIG)
	$(PY) -m gannet check-config --config $(CONFIG)
	exec $(PY) -m gannet serve --config $(CONFIG)

test: install
	$(VENV)/bin/pytest -q -p no:cacheprovider

lint: install
	$(VENV)/bin/ruff check gannet tests bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache *.egg-info

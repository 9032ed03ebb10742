# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when needed.
PYTHON ?= python3
VENV ?= .venv
PORT ?= 8080
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo test lint serve clean chromium ffmpeg postgresql nginx label-studio prometheus dashboard image lock

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(VENV)/bin/gateway demo --port $(PORT)

test: $(STAMP) lint chromium ffmpeg postgresql nginx label-studio prometheus image
	LABEL_STUDIO_VENV=$(LS_VENV) $(VENV)/bin/pytest -q

# Browser tests use Debian's chromium; installed when absent and we are root (CI). Without it
# they are skipped locally and fail under CI=true.
chromium:
	@command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# The browser video test makes its clip at test time with Debian's ffmpeg (about 10 MB: more than
# chromium reads ahead, so a seek needs a range); installed like chromium, skipped / failed alike.
ffmpeg:
	@command -v ffmpeg >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null; }

# Registry tests also run against PostgreSQL: tests/postgres.py starts a private cluster with
# initdb/postgres from PATH or /usr/lib/postgresql/<ver>/bin (Debian's `postgresql`, not on PATH).
# Installed when absent and we are root (CI); no system service is started by us. Without it the
# PostgreSQL cases are skipped locally and fail under CI=true.
PG_LIBDIR ?= /usr/lib/postgresql

postgresql:
	@{ command -v initdb && command -v postgres; } >/dev/null 2>&1 || \
		( for bin in $(PG_LIBDIR)/*/bin; do [ -x "$$bin/initdb" ] && [ -x "$$bin/postgres" ] && exit 0; done; exit 1 ) || \
		[ "$$(id -u)" != 0 ] || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }

# The drop-in tests run a real Label Studio behind nginx (tests/test_label_studio.py). nginx comes
# from Debian (installed when absent and we are root); Label Studio from PyPI, in its own virtual
# environment kept outside the clone (about 1 GB, 3-5 minutes to build once per version).
LS_VERSION ?= 1.23.2
LS_VENV ?= $(HOME)/.cache/gcs-media-gateway/label-studio-$(LS_VERSION)

nginx:
	@PATH="$$PATH:/usr/sbin:/sbin" command -v nginx >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null; }

# tests/test_operations.py runs Debian's Prometheus (and promtool) against `gateway serve`;
# installed when absent and we are root. Without it those tests skip locally, fail under CI=true.
prometheus:
	@{ command -v prometheus && command -v promtool; } >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

# The Grafana dashboard is code (deploy/grafana/dashboard.py); the JSON is its committed output.
dashboard: $(STAMP)
	$(VENV)/bin/python deploy/grafana/dashboard.py > deploy/grafana/gateway-dashboard.json

# The container image, built with podman for tests/test_container.py on a Debian base made here
# with debootstrap (tests/container/build.sh; cached in podman's image store after the first run).
# podman, runc and debootstrap are installed when absent and we are root; without podman the
# image test skips locally and fails under CI=true. CONTAINERS_CONF: this host's podman quirks.
IMAGE ?= localhost/media-gateway:test
IMAGE_BASE ?= localhost/gateway-ci-base:bookworm
export CONTAINERS_CONF ?= $(CURDIR)/tests/container/containers.conf

image:
	@{ command -v podman && command -v runc && command -v debootstrap; } >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null; }
	@if command -v podman >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then tests/container/build.sh $(IMAGE) $(IMAGE_BASE); \
		else echo "image: not built (needs root and podman)"; fi

# The image's dependency locks (hashes included), from pyproject.toml; re-run after changing it.
lock:
	test -x .venv-lock/bin/pip-compile || { $(PYTHON) -m venv .venv-lock && .venv-lock/bin/pip install --quiet 'pip-tools>=7.4,<8'; }
	.venv-lock/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url \
		--no-emit-find-links -o requirements.lock pyproject.toml deploy/container/build.in
	.venv-lock/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url \
		--no-emit-find-links --extra parquet -o requirements-parquet.lock pyproject.toml deploy/container/build.in

label-studio: $(LS_VENV)/.installed

$(LS_VENV)/.installed:
	rm -rf $(LS_VENV) && $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install --quiet --upgrade pip
	$(LS_VENV)/bin/pip install --quiet 'label-studio==$(LS_VERSION)'
	touch $@

# The lanes' differential test (tests/test_lanes_differential.py) with many random examples;
# `make test` runs a fixed, derandomized set.
LANES_EXAMPLES ?= 2000
.PHONY: fuzz-lanes
fuzz-lanes: $(STAMP)
	LANES_EXAMPLES=$(LANES_EXAMPLES) LANES_RANDOM=1 $(VENV)/bin/pytest -q tests/test_lanes_differential.py

lint: $(STAMP)
	$(VENV)/bin/ruff check gateway tests bench deploy
	$(VENV)/bin/ruff format --check gateway tests bench deploy
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/python deploy/kubernetes/check.py

clean:
	rm -rf $(VENV) .venv-lock .demo .pytest_cache build *.egg-info

# `make bench [ARGS="--quick"]`: the benchmark harness (bench/README.md). Needs wrk and nginx;
# installs them with apt-get when absent (as root).
ARGS ?=
BENCH_STAMP := $(VENV)/.bench-installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

$(BENCH_STAMP): $(STAMP)
	$(VENV)/bin/pip install --quiet -e '.[bench]'
	rm -f $(VENV)/.bench-installed-*
	touch $@

.PHONY: bench
bench: $(BENCH_STAMP) label-studio
	@command -v wrk >/dev/null 2>&1 && PATH="$$PATH:/usr/sbin:/sbin" command -v nginx >/dev/null 2>&1 \
		|| { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y wrk nginx-light; }
	$(VENV)/bin/python -m bench $(ARGS)

# PDF.js for the viewer page is committed under gateway/web/static/pdfjs/ (so installs, CI and
# wheels need no npm). This target re-creates those files from the pinned npm tarball; `npm pack`
# checks the registry's integrity hash, and `git diff` then shows whether anything changed.
PDFJS_VERSION ?= 6.5.438
PDFJS_DIR := gateway/web/static/pdfjs

.PHONY: vendor-pdfjs
vendor-pdfjs:
	rm -rf .pdfjs && mkdir .pdfjs
	cd .pdfjs && npm pack --silent pdfjs-dist@$(PDFJS_VERSION) >/dev/null && tar xzf pdfjs-dist-$(PDFJS_VERSION).tgz
	cp .pdfjs/package/build/pdf.min.mjs .pdfjs/package/build/pdf.worker.min.mjs .pdfjs/package/LICENSE $(PDFJS_DIR)/
	rm -rf .pdfjs

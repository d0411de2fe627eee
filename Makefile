# cornjacket — developer and CI entry points (GNU make).
# `make run` and `make test` work on a fresh Debian machine without a container engine:
# scripts/infra.sh installs and starts PostgreSQL (5432), Tansu (Kafka API, 9092) and Mosquitto
# (MQTT, 1883) on 127.0.0.1, state in .infra/ (SPEC §15).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
INFRA := scripts/infra.sh
# Extra arguments: `make run RUN_ARGS="--services ingestion,query"`, `make test TEST_ARGS="outbox"`.
RUN_ARGS ?=
TEST_ARGS ?=
BENCH_ARGS ?=

# Where Docker is available (SPEC §14/§15); not used by run/test.
COMPOSE ?= docker compose
COMPOSE_SKELETON := docker-compose/docker-compose.yaml
COMPOSE_FULLSTACK := docker-compose/docker-compose.fullstack.yaml
COMPOSE_ALL := -f $(COMPOSE_SKELETON) -f $(COMPOSE_FULLSTACK)
DOCKER ?= docker
IMAGE ?= cornjacket
IMAGE_TAG ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo dev)
# End-to-end runner (tests/e2e.rs): base URLs of the stack under test and an optional bearer token.
# Skeleton: the platform on the host (`make run`); fullstack: everything through Traefik on port 80.
E2E_INGEST_URL ?= http://127.0.0.1:8080
E2E_QUERY_URL ?= http://127.0.0.1:8081
E2E_GATEWAY_URL ?= http://localhost
# The fullstack compose file's development JWT secret (docker-compose.fullstack.yaml); e2e-fullstack
# mints its token with it unless CJ_E2E_TOKEN is set.
E2E_FULLSTACK_JWT_SECRET ?= $(or $(CJ_JWT_SECRET),cornjacket-development-only-jwt-secret-not-for-production)
E2E_SCOPES ?= ingest:write query:read actions:admin

.PHONY: docker-check docker-build e2e-skeleton e2e-fullstack fmt

.PHONY: help infra-up test-tools infra-down infra-status build run test lint lint-deps vendor-web bench fuzz chaos migrate-all clean-test-dbs \
	skeleton-up skeleton-down fullstack-up fullstack-down

help:
	@echo "make run            start local infra, build and run 'cornjacket serve' (RUN_ARGS=...)"
	@echo "make test           dependency checks, then local infra and every test suite (TEST_ARGS=...)"
	@echo "make lint           cargo fmt --check, clippy -D warnings (workspace), cargo machete, cargo deny"
	@echo "make lint-deps      only the dependency checks: unused (cargo machete), banned (cargo deny)"
	@echo "make vendor-web     check the vendored front-end assets (vendor/web/), fetch what is missing"
	@echo "make build          release build of the cornjacket binary"
	@echo "make bench          run scripts/bench.sh (BENCH_ARGS=...)"
	@echo "make fuzz           the fuzz targets (fuzz/, cargo-fuzz on nightly), FUZZ_SECONDS (60) each"
	@echo "make chaos          one fault of each kind under load, the long durations (tests/it/chaos.rs; make test runs it short)"
	@echo "make migrate-all    run every service's database migrations"
	@echo "make clean-test-dbs drop the cjtest_* databases left by tests"
	@echo "make infra-up | infra-down | infra-status   local PostgreSQL, Tansu, Mosquitto"
	@echo "make skeleton-up | fullstack-up (and -down) docker compose, where Docker is available"
	@echo "make docker-build   build both images ($(IMAGE), $(IMAGE)-ai-inference; tag $(IMAGE_TAG))"
	@echo "make e2e-skeleton   end-to-end tests against the platform on 127.0.0.1:8080/8081 (make run)"
	@echo "make e2e-fullstack  end-to-end tests through Traefik on http://localhost (make fullstack-up)"
	@echo "make fmt            cargo fmt --all"

infra-up:
	@$(INFRA) up

test-tools:
	@$(INFRA) test-tools

infra-down:
	@$(INFRA) down

infra-status:
	@$(INFRA) status

build:
	$(CARGO) build --release --bin cornjacket

# The platform and, beside it, the ai-inference sidecar (port 8090); Ctrl-C stops both.
run: vendor-web infra-up
	$(CARGO) build --release --bin cornjacket
	@scripts/dev-env.sh
	@scripts/ai.sh venv
	@scripts/ai.sh run & ai=$$!; trap 'kill $$ai 2>/dev/null; wait $$ai' EXIT INT TERM; \
		./target/release/cornjacket serve $(RUN_ARGS)

# The dependency checks first: a second once installed (.ci/run calls only `make test`, so CI runs
# them too); clippy stays in `make lint`, since on a fresh checkout it compiles the whole graph.
test: vendor-web lint-deps infra-up test-tools
	scripts/test.sh $(TEST_ARGS)

lint:
	CARGO=$(CARGO) scripts/lint.sh

lint-deps:
	CARGO=$(CARGO) scripts/lint.sh deps

# The console's front-end assets (vendor/web/, embedded in the binary): a fast no-op while they
# match vendor/web/MANIFEST.tsv; a missing or altered file is fetched again (scripts/vendor-web.sh).
vendor-web:
	@scripts/vendor-web.sh check

bench: infra-up
	scripts/bench.sh $(BENCH_ARGS)

fuzz:
	scripts/fuzz.sh

# The full chaos run (tests/it/chaos.rs with the issue's fault durations: the broker down 30 s,
# the database blackholed 10 s, its connections cut 10 s); `make test` runs the short variant.
chaos: infra-up
	CJ_CHAOS_FULL=1 scripts/test.sh --no-capture -E 'test(/one_fault_of_each_kind/)'


migrate-all: infra-up
	$(CARGO) run --release --bin cornjacket -- migrate

# Databases created by tests are named cjtest_*; drop them all (connected as cornjacket).
PSQL_CJ := PGPASSWORD=cornjacket psql -X -q -At -v ON_ERROR_STOP=1 "postgres://cornjacket@127.0.0.1:5432/cornjacket?sslmode=disable"
TEST_DB_FILTER := FROM pg_database WHERE datname LIKE 'cjtest\_%'

clean-test-dbs: infra-up
	@n=$$($(PSQL_CJ) -c "SELECT count(*) $(TEST_DB_FILTER)"); \
	echo "clean-test-dbs: dropping $$n database(s) named cjtest_*"; \
	printf '%s\n' "SELECT format('DROP DATABASE IF EXISTS %I WITH (FORCE)', datname) $(TEST_DB_FILTER) \gexec" \
		| $(PSQL_CJ) >/dev/null

# The compose and image targets need a container engine; without one they stop with a clear message
# (make run / make test never need one: SPEC §15).
docker-check:
	@$(COMPOSE) version >/dev/null 2>&1 || { \
		echo "error: '$(COMPOSE)' is not available on this machine: install Docker with the compose plugin" >&2; \
		echo "       (make run and make test need no container engine; see SPEC §15)" >&2; \
		exit 1; }

skeleton-up: docker-check
	$(COMPOSE) -f $(COMPOSE_SKELETON) up -d --wait

skeleton-down: docker-check
	$(COMPOSE) -f $(COMPOSE_SKELETON) down

fullstack-up: docker-check
	$(COMPOSE) $(COMPOSE_ALL) up -d --build --wait

fullstack-down: docker-check
	$(COMPOSE) $(COMPOSE_ALL) down

# Both images: the platform (Dockerfile, context .) and the ai-inference sidecar (its own context);
# the :latest tags are the ones docker-compose.fullstack.yaml runs.
docker-build:
	@$(DOCKER) info >/dev/null 2>&1 || { \
		echo "error: no container engine reachable with '$(DOCKER)': docker-build needs Docker" >&2; exit 1; }
	$(DOCKER) build -t $(IMAGE):$(IMAGE_TAG) -t $(IMAGE):latest -f Dockerfile .
	$(DOCKER) build -t $(IMAGE)-ai-inference:$(IMAGE_TAG) -t $(IMAGE)-ai-inference:latest -f ai-inference/Dockerfile ai-inference

fmt:
	$(CARGO) fmt --all

# Against any running stack: `make run`'s by default (E2E_INGEST_URL / E2E_QUERY_URL override).
# CJ_E2E_TOKEN, when set in the environment, is passed through to the runner.
# Against `make run`: mints a token from the development secret in .env unless CJ_E2E_TOKEN is set.
e2e-skeleton:
	token="$${CJ_E2E_TOKEN:-}"; \
	if [[ -z $$token && -f .env ]]; then \
		token=$$($(CARGO) run -q --bin cornjacket -- token --sub e2e-skeleton --scopes '$(E2E_SCOPES)' --ttl 1h); \
	fi; \
	CJ_E2E=1 CJ_E2E_INGEST_URL=$(E2E_INGEST_URL) CJ_E2E_QUERY_URL=$(E2E_QUERY_URL) CJ_E2E_TOKEN="$$token" \
		$(CARGO) test --test it -- --ignored --nocapture e2e::

# Through the gateway (ForwardAuth checks the token): mints one from the compose file's development
# secret unless CJ_E2E_TOKEN is set.
e2e-fullstack:
	token="$${CJ_E2E_TOKEN:-}"; \
	if [[ -z $$token ]]; then \
		token=$$(CJ_JWT_SECRET='$(E2E_FULLSTACK_JWT_SECRET)' $(CARGO) run -q --bin cornjacket -- \
			token --sub e2e-fullstack --scopes '$(E2E_SCOPES)' --ttl 1h); \
	fi; \
	CJ_E2E=1 CJ_E2E_INGEST_URL=$(E2E_GATEWAY_URL) CJ_E2E_QUERY_URL=$(E2E_GATEWAY_URL) CJ_E2E_TOKEN="$$token" \
		$(CARGO) test --test it -- --ignored --nocapture e2e::

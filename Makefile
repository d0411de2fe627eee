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

.PHONY: help infra-up infra-down infra-status build run test lint bench migrate-all clean-test-dbs \
	skeleton-up skeleton-down fullstack-up fullstack-down

help:
	@echo "make run            start local infra, build and run 'cornjacket serve' (RUN_ARGS=...)"
	@echo "make test           start local infra and run every test suite (TEST_ARGS=...)"
	@echo "make lint           cargo fmt --check and clippy -D warnings"
	@echo "make build          release build of the cornjacket binary"
	@echo "make bench          run scripts/bench.sh (BENCH_ARGS=...)"
	@echo "make migrate-all    run every service's database migrations"
	@echo "make clean-test-dbs drop the cjtest_* databases left by tests"
	@echo "make infra-up | infra-down | infra-status   local PostgreSQL, Tansu, Mosquitto"
	@echo "make skeleton-up | fullstack-up (and -down) docker compose, where Docker is available"

infra-up:
	@$(INFRA) up

infra-down:
	@$(INFRA) down

infra-status:
	@$(INFRA) status

build:
	$(CARGO) build --release --bin cornjacket

run: infra-up
	$(CARGO) build --release --bin cornjacket
	exec ./target/release/cornjacket serve $(RUN_ARGS)

test: infra-up
	scripts/test.sh $(TEST_ARGS)

lint:
	$(CARGO) fmt --all -- --check && $(CARGO) clippy --all-targets -- -D warnings

bench: infra-up
	scripts/bench.sh $(BENCH_ARGS)

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

skeleton-up:
	$(COMPOSE) -f $(COMPOSE_SKELETON) up -d

skeleton-down:
	$(COMPOSE) -f $(COMPOSE_SKELETON) down

fullstack-up:
	$(COMPOSE) -f $(COMPOSE_SKELETON) -f $(COMPOSE_FULLSTACK) up -d

fullstack-down:
	$(COMPOSE) -f $(COMPOSE_SKELETON) -f $(COMPOSE_FULLSTACK) down

# notifyd: `make run` starts a dev server, `make test` runs every test.
GO        ?= go
PKGS      := ./...
export NOTIFYD_TEST_DATABASE_URL ?= postgres://127.0.0.1:5432/test?sslmode=disable

.PHONY: run test test-go test-js typecheck lint bench build pg-up e2e-deps bench-report fuzz

## run: create the database, apply migrations, start in dev mode (prints a token, an API key and a curl line)
run: pg-up
	NOTIFY_DEV=1 $(GO) run ./cmd/notifyd

## build: the binaries into bin/
build:
	$(GO) build -o bin/ ./cmd/...

pg-up:
	@.ci/pg-up

## test: lint and the type check, notify.js's tests, then every Go test under -race against the real
## Postgres, browser tests included (e2e-deps installs what they need; NOTIFYD_E2E=1 makes a missing
## tool a failure, not a skip)
test: export NOTIFYD_E2E = 1
test: pg-up e2e-deps lint typecheck test-js test-go

## e2e-deps: chromium, nginx, squid, haproxy (Debian packages), playwright-core and typescript (npm ci), each only when missing
e2e-deps:
	@.ci/e2e-deps

## typecheck: static/notify.js against static/notify.d.ts (tsc --checkJs --noEmit, settings in static/tsconfig.json)
typecheck: e2e-deps
	static/e2e/node_modules/.bin/tsc -p static/tsconfig.json

## test-js: notify.js's event emitter and state events under node's test runner
test-js:
	node --test static/e2e/notify.test.mjs

## test-go: the tests mostly wait on Postgres and sockets, so more run at once than there are cores
## (TEST_PARALLEL; browser tests are bounded apart, by NOTIFYD_E2E_PARALLEL)
TEST_PARALLEL ?= 4
test-go:
	$(GO) test -race -count=1 -timeout 20m -parallel $(TEST_PARALLEL) $(PKGS)

## lint: go vet, gofmt and staticcheck (pinned; fetched through the module proxy on first use)
STATICCHECK ?= honnef.co/go/tools/cmd/staticcheck@v0.8.2
lint:
	$(GO) vet $(PKGS)
	$(GO) run $(STATICCHECK) $(PKGS)
	@out=$$(gofmt -l $$(git ls-files '*.go') 2>/dev/null); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi

## fuzz: each fuzzer of client input for FUZZTIME (default 30s); `make test` runs their seeds
FUZZTIME ?= 30s
fuzz: pg-up
	$(GO) test -run '^$$' -fuzz '^FuzzParseClientMessages$$' -fuzztime $(FUZZTIME) ./handlers/realtime
	$(GO) test -run '^$$' -fuzz '^FuzzTrackerGet$$' -fuzztime $(FUZZTIME) ./handlers/realtime
	$(GO) test -run '^$$' -fuzz '^FuzzParsePayload$$' -fuzztime $(FUZZTIME) ./store
	$(GO) test -run '^$$' -fuzz '^FuzzNames$$' -fuzztime $(FUZZTIME) ./handlers

## bench-report: the reporting views at 10M deliveries / 2M notifications (timings and EXPLAIN plans in bench-report.md;
## about 10 min), then recording on vs off (delivered notifications/s over WebSocket)
bench-report: pg-up
	NOTIFYD_BENCH_REPORT=1 NOTIFYD_BENCH_OUT=$(CURDIR)/bench-report.md $(GO) test -run '^TestReportAtScale$$' -count=1 -timeout 60m -v ./store/
	$(GO) test -run '^$$' -bench 'BenchmarkRecording' -benchtime 5s -count 3 -timeout 20m ./cmd/notifyd/

## bench: Go benchmarks, the notifybench scenarios and the echo floor (cmd/notifybench/suite.sh; about 9 min)
bench: pg-up
	GO=$(GO) cmd/notifybench/suite.sh

# notifyd: `make run` starts a dev server, `make test` runs every test.
GO        ?= go
PKGS      := ./...
export NOTIFYD_TEST_DATABASE_URL ?= postgres://127.0.0.1:5432/test?sslmode=disable

.PHONY: run test test-go lint bench build pg-up

## run: create the database, apply migrations, start in dev mode (prints a token, an API key and a curl line)
run: pg-up
	NOTIFY_DEV=1 $(GO) run ./cmd/notifyd

## build: the binaries into bin/
build:
	$(GO) build -o bin/ ./cmd/...

pg-up:
	@.ci/pg-up

## test: lint, then every Go test under -race against the real Postgres
test: pg-up lint test-go

test-go:
	$(GO) test -race -count=1 -timeout 20m $(PKGS)

## lint: go vet and gofmt
lint:
	$(GO) vet $(PKGS)
	@out=$$(gofmt -l $$(git ls-files '*.go') 2>/dev/null); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi

## bench: Go benchmarks, then the notifybench scenarios (cmd/notifybench/suite.sh; about 8 min)
bench: pg-up
	GO=$(GO) cmd/notifybench/suite.sh

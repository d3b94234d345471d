#!/usr/bin/env bash
# The default performance suite (`make bench`): the Go benchmarks of every
# package, then the notifybench scenarios against a freshly built notifyd
# (one server process per scenario, its own schema, NOTIFY_DEV=0).
# Fits 2 cores and 24 GiB and takes about 11 minutes (12 with BENCH_BASELINE_BIN).
#
#   OUT=/tmp/notifyd-bench BENCH_SCENARIOS=default BENCH_PPROF=1 cmd/notifybench/suite.sh
#
# Results: $OUT/results.md (the scenario table, the floors and the table of
# issue 16's targets, each a ratio to a floor of the same run), $OUT/results.json, $OUT/goals.json,
# $OUT/gobench.txt, $OUT/echo-floor.md (the bare server's floors), server logs, and with BENCH_PPROF=1 CPU and heap profiles,
# and each publish phase's allocations, in $OUT/pprof (read them with `go tool pprof $OUT/bin/notifyd FILE`).
set -euo pipefail
cd "$(dirname "$0")/../.."
GO=${GO:-go}
OUT=${OUT:-${TMPDIR:-/tmp}/notifyd-bench}
SCENARIOS=${BENCH_SCENARIOS:-default}
GOBENCH=${BENCH_GO:-1}
export NOTIFYD_TEST_DATABASE_URL=${NOTIFYD_TEST_DATABASE_URL:-postgres://127.0.0.1:5432/test?sslmode=disable}

mkdir -p "$OUT/bin"
# The single-publish rate target is a ratio to a baseline: with
# BENCH_BASELINE_BIN (a notifyd binary of the commit to compare with) the
# publish-single scenario runs against it and against this build in turn
# (the rate pairs, below), before the others;
# else BENCH_BASELINE names an earlier results.json, by default the previous
# run in $OUT; BENCH_BASELINE_RATE gives the rate as a number.
if [ -f "$OUT/results.json" ]; then mv "$OUT/results.json" "$OUT/previous-results.json"; fi
rm -f "$OUT/echo-floor.json"
BASELINE=${BENCH_BASELINE:-$OUT/previous-results.json}
.ci/pg-up
$GO build -o "$OUT/bin/" ./cmd/notifyd ./cmd/notifybench

# The Go benchmarks that carry a target (sweep cost at 1M sessions), the
# store's publish paths, the publish hook's memory of recent rows when full
# (BenchmarkRememberFull), and the side-by-side benchmarks of the low-level
# tricks, each with and without it in one run: the sweep's read-ahead
# (BenchmarkSweepReadAhead, in the Sweep run), the recorder's queue
# (BenchmarkRecorderQueue, in the store run), growStack
# (BenchmarkAuthClientConnect) and sendAll's write deadline armed only when
# the socket is full (BenchmarkWSWriteDeadline). BENCH_GO_ALL=1 runs every package's
# benchmarks (cmd/notifyd's alone take several minutes).
if [ "$GOBENCH" = 1 ]; then
  echo "== Go benchmarks" >&2
  if [ "${BENCH_GO_ALL:-0}" = 1 ]; then
    $GO test -run '^$' -bench . -benchmem -count=1 -timeout 20m ./... | tee "$OUT/gobench.txt"
  else
    # A fixed count: each sweep op rebuilds its expiring sessions untimed,
    # and the default time-based ramp-up spends minutes on that. Three runs
    # of the sweep, since at a million sessions one run moves with whatever
    # else the machine does (report the median).
    { $GO test -run '^$' -bench 'Sweep' -benchtime 30x -benchmem -count=3 -timeout 10m ./handlers/realtime
      $GO test -run '^$' -bench 'RememberFull' -benchmem -count=3 -timeout 10m ./handlers/realtime
      $GO test -run '^$' -bench . -benchtime 20x -benchmem -count=1 -timeout 10m ./store
      $GO test -run '^$' -bench 'AuthClientConnect|WSWriteDeadline' -benchmem -count=3 -timeout 10m ./handlers; } | tee "$OUT/gobench.txt" ||
      echo "== a Go benchmark failed (see $OUT/gobench.txt); the scenarios run anyway" >&2
  fi
fi

pprof=()
if [ "${BENCH_PPROF:-0}" = 1 ]; then pprof=(-pprof); fi
# The rate pairs: publish-single against the baseline binary and against this
# build right after it, BENCH_RATE_PAIRS times (default 2), so that what this
# shared machine does in a given minute weighs on both alike; the rate target
# compares the medians (notifybench -goals reads $OUT/rate).
rm -rf "$OUT/rate"
if [ -n "${BENCH_BASELINE_BIN:-}" ]; then
  for i in $(seq 1 "${BENCH_RATE_PAIRS:-2}"); do
    echo "== rate pair $i: publish-single against $BENCH_BASELINE_BIN, then this build" >&2
    "$OUT/bin/notifybench" -spawn "$BENCH_BASELINE_BIN" -scenarios publish-single -out "$OUT/rate/$i-baseline" \
      -commit "baseline $BENCH_BASELINE_BIN" >/dev/null
    "$OUT/bin/notifybench" -spawn "$OUT/bin/notifyd" -scenarios publish-single -out "$OUT/rate/$i-current" \
      -commit "$(git rev-parse --short HEAD)" >/dev/null
  done
  BASELINE=$OUT/rate/1-baseline/results.json
fi
echo "== notifybench scenarios: $SCENARIOS" >&2
"$OUT/bin/notifybench" -spawn "$OUT/bin/notifyd" -scenarios "$SCENARIOS" -out "$OUT" \
  -commit "$(git rev-parse --short HEAD)$(git diff --quiet HEAD 2>/dev/null || echo ' (dirty)')" \
  "${pprof[@]}"

# The floors that ws-idle, storm and publish-single compare with: a bare
# gorilla and net/http server under the same load from the same clients
# (about 80 s; BENCH_ECHO=0 skips it).
if [ "${BENCH_ECHO:-1}" = 1 ]; then
  echo "== echo floor" >&2
  "$OUT/bin/notifybench" -echo-floor -ws 19000 -ping 20s -idle 40s -out "$OUT"
fi

# One table: every target of issue 16 beside the floor it is a ratio of.
echo "== targets" >&2
baseline=()
if [ -n "${BENCH_BASELINE_RATE:-}" ]; then baseline=(-baseline-rate "$BENCH_BASELINE_RATE")
elif [ -f "$BASELINE" ]; then baseline=(-baseline "$BASELINE"); fi
"$OUT/bin/notifybench" -goals -out "$OUT" "${baseline[@]}"

# Optional (BENCH_CLUSTER=1): the cost of cluster mode, 1 node, 3 separate nodes and 3 nodes on one
# schema, in three interleaved rounds: connect storm, idle WebSocket CPU and single publishes (about
# 9 minutes; $OUT/cluster.md).
if [ "${BENCH_CLUSTER:-0}" = 1 ]; then
  echo "== cluster mode: 1 node, 3 separate nodes, a cluster of 3; 3 rounds" >&2
  "$OUT/bin/notifybench" -spawn "$OUT/bin/notifyd" -cluster-compare -nodes 3 -cluster-idle-for 20s -out "$OUT" \
    -commit "$(git rev-parse --short HEAD)"
fi

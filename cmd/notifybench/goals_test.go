package main

import (
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// goalRun is a run with fixed figures: every target of issue 16 is either
// just met or just missed, so the test sees both sides of each comparison.
func goalRun() (*Report, *Floors) {
	idle := 2.0
	rep := &Report{Results: []*Result{
		{Scenario: Scenario{Name: "publish-single", PublishFor: 10 * time.Second}, Publish: &PublishResult{Mode: publishSingle, Publishers: 64,
			PublishedPerSec: 8000, Latency: Percentiles{N: 10, P50: 5, P99: 25},
			CPU: &phaseCPU{ServerUS: 100, PostgresUS: 61}, CallsPerTx: 16}},
		{Scenario: Scenario{Name: "publish-batch-100"}, Publish: &PublishResult{Mode: publishBatch, Publishers: 4, Batch: 100,
			PublishedPerSec: 10000, Latency: Percentiles{N: 10, P50: 30, P99: 80}, // 400 rows / 10,000/s = 40 ms; 80 = 2×
			CPU: &phaseCPU{ServerUS: 30, PostgresUS: 40}}},
		{Scenario: Scenario{Name: "publish-batch"}, Publish: &PublishResult{Mode: publishBatch, Publishers: 4, Batch: 1000,
			PublishedPerSec: 20000, Latency: Percentiles{N: 10, P50: 150, P99: 401}, // 4,000 / 20,000/s = 200 ms
			CPU: &phaseCPU{ServerUS: 31, PostgresUS: 39}}},
		{Scenario: Scenario{Name: "storm"}, Connect: &ConnectResult{Sessions: 5000, PerSecond: 6000,
			CPU: &phaseCPU{ServerUS: 120, PostgresUS: 41}}},
		{Scenario: Scenario{Name: "ws-idle"}, IdleCPU: &idle, Memory: &MemoryResult{PerSession: 8<<10 + 1}},
		{Scenario: Scenario{Name: "publish-long", PublishFor: 45 * time.Second}, Publish: &PublishResult{Mode: publishSingle, Publishers: 64,
			PublishedPerSec: 9000, Latency: Percentiles{N: 10, P50: 6, P99: 30}, CPU: &phaseCPU{ServerUS: 80}},
			Checks: []Check{{Pass: true}}},
		{Scenario: Scenario{Name: "evict"}, Evict: &EvictResult{Silent: 1, Evicted: 1}, Checks: []Check{{Pass: true}}},
		{Scenario: Scenario{Name: "reconnect"}, Reconnect: &ReconnectResult{AllSynced: 9}, Checks: []Check{{Pass: false}}},
	}}
	f := &Floors{
		HTTP:  &RequestFloor{CPU: &phaseCPU{ServerUS: 50}},
		Storm: &ConnectFloor{PerSecond: 7500, CPU: &phaseCPU{ServerUS: 100}},
		Idle:  &EchoFloor{CPU: 2.0 / 0.7},
	}
	return rep, f
}

func TestGoals(t *testing.T) {
	rep, f := goalRun()
	gs := goals(rep, f, &Baseline{SinglePerSec: 4000, From: "test"})
	want := []struct {
		scenario, what string
		met            bool
		measured       string
	}{
		{"publish-single", "server CPU per committed notification", true, "2.00×"},
		{"publish-single", "Postgres CPU per single-published row", false, "61 µs"},
		{"publish-single", "committed notifications/s", true, "2.00×"},
		{"publish-single", "publish-to-receive p99", true, "25.0 ms"},
		{"publish-batch-100", "Postgres CPU per row", true, "40 µs"},
		{"publish-batch-100", "server CPU per row", true, "30 µs"},
		{"publish-batch-100", "publish-to-receive p99", true, "2.00×"},
		{"publish-batch", "Postgres CPU per row", true, "39 µs"},
		{"publish-batch", "server CPU per row", false, "31 µs"},
		{"publish-batch", "publish-to-receive p99", false, "2.00×"}, // 401/200 = 2.005
		{"storm", "connects/s, each replay checked", true, "0.80×"},
		{"storm", "server + Postgres CPU per connect", false, "1.61×"},
		{"ws-idle", "idle server CPU (0s pings)", true, "0.70×"},
		{"ws-idle", "server RSS per idle session", false, "8.0 KiB"},
		{"publish-long", "no regression over 45s: server CPU per notification, p99", true, "server 80 µs, p99 30.0 ms (9,000/s, 0 lost)"},
		{"reconnect", "no regression: all synced after the reconnect", false, "9.00 s"},
		{"evict", "no regression: eviction lag", true, "max 0 ms"},
	}
	if len(gs) != len(want) {
		for _, g := range gs {
			t.Logf("%+v", g)
		}
		t.Fatalf("%d goals, want %d", len(gs), len(want))
	}
	for i, w := range want {
		g := gs[i]
		if g.Scenario != w.scenario || g.What != w.what {
			t.Errorf("goal %d is %s / %s, want %s / %s", i, g.Scenario, g.What, w.scenario, w.what)
			continue
		}
		if !g.Known || g.Met != w.met || !strings.HasPrefix(g.Measured, w.measured) {
			t.Errorf("%s / %s: known %v met %v measured %q, want met %v measured %q...", g.Scenario, g.What, g.Known, g.Met, g.Measured, w.met, w.measured)
		}
	}
	if g := gs[14]; !strings.Contains(g.Floor, "publish-single (10s): server 100 µs, p99 25.0 ms") {
		t.Errorf("publish-long row's floor %q, want the 10 s run's figures", g.Floor)
	}
	if g := gs[9]; !strings.Contains(g.Floor, "4,000 rows in flight at 20,000/s wait 200 ms") {
		t.Errorf("Little's law floor: %q", g.Floor)
	}

	var b strings.Builder
	writeGoals(&b, gs)
	if n := strings.Count(b.String(), "\n"); n != len(gs)+2 {
		t.Errorf("table has %d lines, want %d:\n%s", n, len(gs)+2, b.String())
	}
	if !strings.Contains(b.String(), "| publish-single | Postgres CPU per single-published row | — | 61 µs") {
		t.Errorf("table:\n%s", b.String())
	}
}

// TestGoalsUnknown checks that a goal without its floor or baseline is
// unknown, never met.
func TestGoalsUnknown(t *testing.T) {
	rep, _ := goalRun()
	for _, g := range goals(rep, nil, nil) {
		// Little's law is computed from the run itself.
		ratio := strings.Contains(g.Target, "×") && !strings.HasPrefix(g.Floor, "Little")
		if ratio && (g.Known || g.Met) {
			t.Errorf("%s / %s has no floor but known %v met %v", g.Scenario, g.What, g.Known, g.Met)
		}
	}
	gs := goals(&Report{}, nil, nil)
	for _, g := range gs {
		if g.Known || g.Met {
			t.Errorf("%s / %s known without a run", g.Scenario, g.What)
		}
	}
	if len(gs) == 0 {
		t.Fatal("no goals for an empty run")
	}
}

// TestGoalsRatePairs: with rate pairs, the rate target is the ratio of the medians of this
// build's and the baseline's runs, whatever the scenario run measured.
func TestGoalsRatePairs(t *testing.T) {
	rep, f := goalRun() // the scenario run: 8,000/s
	for _, c := range []struct {
		pairs    []RatePair
		met      bool
		measured string
	}{
		{[]RatePair{{Baseline: 4000, Current: 7000}, {Baseline: 5000, Current: 9000}, {Baseline: 3000, Current: 8000}}, true, "2.00× (median 8,000/s"},
		{[]RatePair{{Baseline: 4000, Current: 7000}, {Baseline: 5000, Current: 9000}}, false, "1.78× (median 8,000/s"}, // 8,000 / 4,500
	} {
		gs := goals(rep, f, &Baseline{SinglePerSec: 1, From: "test", Pairs: c.pairs})
		g := gs[2]
		if g.What != "committed notifications/s" || !g.Known || g.Met != c.met || !strings.HasPrefix(g.Measured, c.measured) {
			t.Errorf("%v: %+v, want met %v measured %q...", c.pairs, g, c.met, c.measured)
		}
	}
}

// TestRatePairs: pairs are read in order while both runs of a pair are there.
func TestRatePairs(t *testing.T) {
	dir := t.TempDir()
	run := func(name string, rate float64) {
		rep := &Report{Results: []*Result{{Scenario: Scenario{Name: "publish-single"},
			Publish: &PublishResult{PublishedPerSec: rate, CPU: &phaseCPU{Cores: 2, MachineUS: 1e6 / rate}}}}}
		if err := os.MkdirAll(filepath.Join(dir, name), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := writeJSON(filepath.Join(dir, name, "results.json"), rep); err != nil {
			t.Fatal(err)
		}
	}
	run("1-baseline", 100)
	run("1-current", 200)
	run("2-baseline", 110)
	run("2-current", 190)
	run("3-baseline", 120) // its current run is missing: not a pair
	ps, err := ratePairs(dir)
	if err != nil {
		t.Fatal(err)
	}
	rates := func(ps []RatePair) (out [][2]float64) {
		for _, p := range ps {
			out = append(out, [2]float64{p.Baseline, p.Current})
		}
		return out
	}
	if got, want := rates(ps), [][2]float64{{100, 200}, {110, 190}}; !slices.Equal(got, want) {
		t.Errorf("pairs %v, want %v", got, want)
	}
	// The current runs' CPU comes along: their median machine CPU is 1e6/190 and 1e6/200 µs.
	if c := pairCPU(ps); c == nil || c.Cores != 2 || math.Abs(c.MachineUS-(1e6/200+1e6/190)/2) > 1e-6 {
		t.Errorf("pairCPU = %+v, want 2 cores and the median of the current runs' machine CPU", c)
	}
	if ps, err := ratePairs(filepath.Join(dir, "none")); err != nil || len(ps) != 0 {
		t.Errorf("no rate dir: %v, %v", ps, err)
	}
}

func TestCeiling(t *testing.T) {
	// 2 cores at 200 µs a notification make at most 10,000/s: 1.25× a baseline of 8,000/s.
	c := &phaseCPU{Cores: 2, MachineUS: 200, ServerUS: 90, PostgresUS: 50, BenchUS: 60}
	got := ceiling(c, "this run", "notification", 8000, "baseline")
	want := "; this run spent 200 µs of machine CPU per notification (server 90, Postgres 50, tool 60): at that, 2 cores make about 10,000/s at most, 1.25× the baseline"
	if got != want {
		t.Errorf("ceiling = %q, want %q", got, want)
	}
	for _, c := range []*phaseCPU{nil, {MachineUS: 200}, {Cores: 2}} {
		if got := ceiling(c, "this run", "connect", 1000, "floor"); got != "" {
			t.Errorf("ceiling(%+v) = %q, want empty (figures missing)", c, got)
		}
	}
	// The rate row carries it when the run has the figures.
	rep, f := goalRun()
	rep.Results[0].Publish.CPU = c
	for _, g := range goals(rep, f, &Baseline{SinglePerSec: 8000, From: "test"}) {
		if g.What == "committed notifications/s" && !strings.Contains(g.Measured, "make about 10,000/s at most, 1.25× the baseline") {
			t.Errorf("rate row %q lacks the ceiling", g.Measured)
		}
	}
}

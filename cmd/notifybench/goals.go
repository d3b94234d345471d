package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// The goals table judges one run against the targets of issue 16, each a
// ratio to a floor measured in the same run (-echo-floor) or a CPU cost per
// unit, so that the machine's speed, which varies from one half hour to the
// next, cancels. `notifybench -goals -out DIR` reads DIR/results.json and
// DIR/echo-floor.json and writes the table into DIR/results.md (after the
// scenario table and the floors), DIR/goals.json and stdout.

// Goal is one judged target.
type Goal struct {
	Scenario string `json:"scenario"`
	What     string `json:"what"`
	// Floor is what the measure is a ratio of (empty for an absolute one).
	Floor    string `json:"floor"`
	Measured string `json:"measured"`
	Target   string `json:"target"`
	// Known is false when an input was missing (a scenario that did not
	// run, no floor, no baseline): then Met is false too.
	Known bool `json:"known"`
	Met   bool `json:"met"`
}

// Baseline is what the single-publish rate target compares with: today's
// rate, from an earlier results.json or given as a number.
type Baseline struct {
	SinglePerSec float64 `json:"single_per_sec"`
	From         string  `json:"from"`
	// Report is the earlier run, for the no-regression rows (may be nil).
	Report *Report `json:"-"`
	// Pairs, when there are any, are publish-single runs of the baseline binary and of this
	// build back to back (make bench's rate pairs): then the rate target compares their
	// medians, so that what the machine does in a given minute weighs on both alike.
	Pairs []RatePair `json:"pairs,omitempty"`
}

// RatePair is one publish-single run of the baseline binary and one of this build right
// after it, in committed notifications/s.
type RatePair struct {
	Baseline float64 `json:"baseline"`
	Current  float64 `json:"current"`
	// CurrentCPU is the CPU of this build's run (nil when its results lack it).
	CurrentCPU *phaseCPU `json:"current_cpu,omitempty"`
}

// pairCPU is the median CPU per unit of the pairs' runs of this build (nil when none has it).
func pairCPU(ps []RatePair) *phaseCPU {
	var machine, server, pg, tool []float64
	cores := 0
	for _, p := range ps {
		if c := p.CurrentCPU; c != nil {
			machine, server = append(machine, c.MachineUS), append(server, c.ServerUS)
			pg, tool = append(pg, c.PostgresUS), append(tool, c.BenchUS)
			cores = c.Cores
		}
	}
	if len(machine) == 0 {
		return nil
	}
	return &phaseCPU{Cores: cores, MachineUS: median(machine), ServerUS: median(server), PostgresUS: median(pg), BenchUS: median(tool)}
}

// pairMedians are the medians of the pairs' baseline and current rates.
func pairMedians(ps []RatePair) (base, cur float64) {
	b := make([]float64, len(ps))
	c := make([]float64, len(ps))
	for i, p := range ps {
		b[i], c[i] = p.Baseline, p.Current
	}
	return median(b), median(c)
}

// median of xs (the mean of the middle two for an even count); 0 for none.
func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	xs = slices.Clone(xs)
	slices.Sort(xs)
	if n := len(xs); n%2 == 0 {
		return (xs[n/2-1] + xs[n/2]) / 2
	}
	return xs[len(xs)/2]
}

// goalRatios are the targets of issue 16.
const (
	singleServerVsFloor  = 2.0  // server CPU per single publish ÷ floor's per request, at most
	singlePostgresUS     = 60.0 // Postgres CPU per single-published row, µs, at most
	singleRateVsBaseline = 2.0  // single-publish rate ÷ baseline, at least
	singleP99Ms          = 25.0 // publish-to-receive p99, at most
	batchPostgresUS      = 40.0 // Postgres CPU per batched row, µs, at most
	batchServerUS        = 30.0 // server CPU per batched row, µs, at most
	batchP99VsLittle     = 2.0  // batched p99 ÷ Little's law's mean wait, at most
	stormRateVsFloor     = 0.8  // connects/s ÷ bare handshakes/s, at least
	stormCPUVsFloor      = 1.6  // (server + Postgres) CPU per connect ÷ floor's server CPU per handshake, at most
	idleCPUVsFloor       = 0.7  // idle WebSocket CPU ÷ bare echo server's, at most
	idleRSSBytes         = 8 << 10
)

// goals computes the table from one run's results and floors. f or any of
// its parts may be nil (the floor did not run): those goals are unknown.
func goals(rep *Report, f *Floors, base *Baseline) []Goal {
	var gs []Goal
	byName := map[string]*Result{}
	for _, r := range rep.Results {
		byName[r.Scenario.Name] = r
	}
	if f == nil {
		f = &Floors{}
	}
	add := func(g Goal) { gs = append(gs, g) }
	missing := func(sc, what, floor, target, why string) {
		add(Goal{Scenario: sc, What: what, Floor: floor, Target: target, Measured: why})
	}

	// Single publishes.
	const single = "publish-single"
	if p := publishOf(byName[single]); p == nil {
		missing(single, "server CPU per committed notification", "bare net/http 201: server CPU per request",
			fmt.Sprintf("<= %g×", singleServerVsFloor), "scenario did not run")
	} else {
		what, floorName, target := "server CPU per committed notification", "bare net/http 201: server CPU per request", fmt.Sprintf("<= %g×", singleServerVsFloor)
		if f.HTTP == nil || f.HTTP.CPU == nil || f.HTTP.CPU.ServerUS <= 0 {
			missing(single, what, floorName, target, fmt.Sprintf("%.0f µs; no floor", p.CPU.ServerUS))
		} else {
			r := p.CPU.ServerUS / f.HTTP.CPU.ServerUS
			add(Goal{Scenario: single, What: what, Floor: fmt.Sprintf("%s (%.0f µs)", floorName, f.HTTP.CPU.ServerUS),
				Measured: fmt.Sprintf("%.2f× (%.0f µs)", r, p.CPU.ServerUS), Target: target, Known: true, Met: r <= singleServerVsFloor})
		}
		add(Goal{Scenario: single, What: "Postgres CPU per single-published row",
			Measured: fmt.Sprintf("%.0f µs (%.1f requests per transaction)", p.CPU.PostgresUS, p.CallsPerTx),
			Target:   fmt.Sprintf("<= %g µs", singlePostgresUS), Known: true, Met: p.CPU.PostgresUS <= singlePostgresUS})
		what, target = "committed notifications/s", fmt.Sprintf(">= %g× baseline", singleRateVsBaseline)
		if base != nil && len(base.Pairs) > 0 {
			b, c := pairMedians(base.Pairs)
			var runs []string
			for _, pr := range base.Pairs {
				runs = append(runs, fmt.Sprintf("%s → %s", num(pr.Baseline), num(pr.Current)))
			}
			r := c / b
			add(Goal{Scenario: single, What: what,
				Floor: fmt.Sprintf("baseline %s/s, median of %d runs alternated with this build's (%s)", num(b), len(base.Pairs), base.From),
				Measured: fmt.Sprintf("%.2f× (median %s/s; pairs %s/s; the scenario run %s/s%s)", r, num(c), strings.Join(runs, ", "), num(p.PublishedPerSec),
					ceiling(pairCPU(base.Pairs), "this build's pair runs (median)", "notification", b, "baseline")),
				Target: target, Known: b > 0, Met: b > 0 && r >= singleRateVsBaseline})
		} else if base == nil || base.SinglePerSec <= 0 {
			missing(single, what, "baseline (-baseline)", target, fmt.Sprintf("%s/s; no baseline", num(p.PublishedPerSec)))
		} else {
			r := p.PublishedPerSec / base.SinglePerSec
			add(Goal{Scenario: single, What: what, Floor: fmt.Sprintf("baseline %s/s (%s)", num(base.SinglePerSec), base.From),
				Measured: fmt.Sprintf("%.2f× (%s/s%s)", r, num(p.PublishedPerSec), ceiling(p.CPU, "this run", "notification", base.SinglePerSec, "baseline")),
				Target:   target, Known: true, Met: r >= singleRateVsBaseline})
		}
		add(Goal{Scenario: single, What: "publish-to-receive p99",
			Measured: fmt.Sprintf("%.1f ms (p50 %.1f; request p50 %.1f / p99 %.1f%s)", p.Latency.P99, p.Latency.P50, p.Request.P50, p.Request.P99, storeShare(p)),
			Target:   fmt.Sprintf("<= %g ms", singleP99Ms), Known: true, Met: p.Latency.P99 <= singleP99Ms && p.Latency.N > 0})
	}

	// Batched publishes.
	for _, sc := range []string{"publish-batch-100", "publish-batch"} {
		p := publishOf(byName[sc])
		if p == nil {
			missing(sc, "Postgres and server CPU per row, p99", "", "", "scenario did not run")
			continue
		}
		add(Goal{Scenario: sc, What: "Postgres CPU per row", Measured: fmt.Sprintf("%.0f µs", p.CPU.PostgresUS),
			Target: fmt.Sprintf("<= %g µs", batchPostgresUS), Known: true, Met: p.CPU.PostgresUS <= batchPostgresUS})
		add(Goal{Scenario: sc, What: "server CPU per row", Measured: fmt.Sprintf("%.0f µs", p.CPU.ServerUS),
			Target: fmt.Sprintf("<= %g µs", batchServerUS), Known: true, Met: p.CPU.ServerUS <= batchServerUS})
		inFlight := float64(p.Publishers * p.Batch)
		if p.PublishedPerSec <= 0 {
			missing(sc, "publish-to-receive p99", "Little's law", "", "nothing committed")
			continue
		}
		little := 1000 * inFlight / p.PublishedPerSec // ms, the mean wait L/λ
		r := p.Latency.P99 / little
		add(Goal{Scenario: sc, What: "publish-to-receive p99",
			Floor:    fmt.Sprintf("Little's law: %s rows in flight at %s/s wait %.0f ms on average", num(inFlight), num(p.PublishedPerSec), little),
			Measured: fmt.Sprintf("%.2f× (p99 %.0f ms, p50 %.0f ms%s)", r, p.Latency.P99, p.Latency.P50, storeShare(p)),
			Target:   fmt.Sprintf("<= %g× the mean", batchP99VsLittle), Known: p.Latency.N > 0, Met: p.Latency.N > 0 && r <= batchP99VsLittle})
	}

	// Connect storm.
	const storm = "storm"
	if r := byName[storm]; r == nil || r.Connect == nil || r.Connect.CPU == nil {
		missing(storm, "connects/s, CPU per connect", "", "", "scenario did not run")
	} else if f.Storm == nil || f.Storm.CPU == nil || f.Storm.PerSecond <= 0 || f.Storm.CPU.ServerUS <= 0 {
		missing(storm, "connects/s, CPU per connect", "bare handshakes", "", fmt.Sprintf("%s/s; no floor", num(r.Connect.PerSecond)))
	} else {
		c := r.Connect
		ok := c.Errors == 0 && c.ReplayBad == 0
		rate := c.PerSecond / f.Storm.PerSecond
		add(Goal{Scenario: storm, What: "connects/s, each replay checked", Floor: fmt.Sprintf("bare handshakes %s/s", num(f.Storm.PerSecond)),
			Measured: fmt.Sprintf("%.2f× (%s/s, %d errors, %d bad replays%s)", rate, num(c.PerSecond), c.Errors, c.ReplayBad,
				ceiling(c.CPU, "this run", "connect", f.Storm.PerSecond, "floor")),
			Target: fmt.Sprintf(">= %g×", stormRateVsFloor), Known: true, Met: ok && rate >= stormRateVsFloor})
		cpu := c.CPU.ServerUS + c.CPU.PostgresUS
		rc := cpu / f.Storm.CPU.ServerUS
		add(Goal{Scenario: storm, What: "server + Postgres CPU per connect", Floor: fmt.Sprintf("bare handshake: server CPU %.0f µs", f.Storm.CPU.ServerUS),
			Measured: fmt.Sprintf("%.2f× (%.0f + %.0f µs)", rc, c.CPU.ServerUS, c.CPU.PostgresUS),
			Target:   fmt.Sprintf("<= %g×", stormCPUVsFloor), Known: true, Met: rc <= stormCPUVsFloor})
	}

	// Idle WebSocket.
	const idle = "ws-idle"
	if r := byName[idle]; r == nil || r.IdleCPU == nil || r.Memory == nil {
		missing(idle, "idle CPU, memory per session", "", "", "scenario did not run")
	} else {
		what, target := fmt.Sprintf("idle server CPU (%s pings)", r.Scenario.PingInterval), fmt.Sprintf("<= %g×", idleCPUVsFloor)
		if f.Idle == nil || f.Idle.CPU <= 0 {
			missing(idle, what, "bare echo server", target, fmt.Sprintf("%.2f%%; no floor", *r.IdleCPU))
		} else {
			x := *r.IdleCPU / f.Idle.CPU
			add(Goal{Scenario: idle, What: what, Floor: fmt.Sprintf("bare echo server %.2f%% of a core", f.Idle.CPU),
				Measured: fmt.Sprintf("%.2f× (%.2f%%)", x, *r.IdleCPU), Target: target, Known: true, Met: x <= idleCPUVsFloor})
		}
		add(Goal{Scenario: idle, What: "server RSS per idle session", Measured: kib(r.Memory.PerSession),
			Target: "<= " + kib(idleRSSBytes), Known: true, Met: r.Memory.PerSession <= idleRSSBytes})
	}

	// Single publishes in the steady state, beside the 10 s run's figures.
	if r := byName["publish-long"]; publishOf(r) != nil {
		p := r.Publish
		g := Goal{Scenario: r.Scenario.Name, What: fmt.Sprintf("no regression over %s: server CPU per notification, p99", r.Scenario.PublishFor),
			Measured: fmt.Sprintf("server %.0f µs, p99 %.1f ms (%s/s, %d lost)", p.CPU.ServerUS, p.Latency.P99, num(p.PublishedPerSec), p.Lost),
			Target:   "its checks met", Known: true}
		_, g.Met = headline(r)
		if s := publishOf(byName[single]); s != nil {
			g.Floor = fmt.Sprintf("publish-single (%s): server %.0f µs, p99 %.1f ms", byName[single].Scenario.PublishFor, s.CPU.ServerUS, s.Latency.P99)
		}
		add(g)
	}

	// The rest: no regression, each with its own checks and, when an
	// earlier run is given, its figure there.
	for _, sc := range []string{"floor", "sse-idle", "poll-idle", "publish-sql", "mixed", "reconnect", "evict"} {
		r := byName[sc]
		if r == nil {
			continue
		}
		measured, met := headline(r)
		g := Goal{Scenario: sc, What: "no regression: " + headlineWhat(r), Measured: measured, Target: "its checks met", Known: true, Met: met}
		if base != nil && base.Report != nil {
			for _, old := range base.Report.Results {
				if old.Scenario.Name == sc {
					m, _ := headline(old)
					g.Floor = "earlier run: " + m
				}
			}
		}
		add(g)
	}
	return gs
}

func publishOf(r *Result) *PublishResult {
	if r == nil || r.Publish == nil || r.Publish.CPU == nil {
		return nil
	}
	return r.Publish
}

// headlineWhat names the figure headline gives.
func headlineWhat(r *Result) string {
	switch {
	case r.Evict != nil:
		return "eviction lag"
	case r.Reconnect != nil:
		return "all synced after the reconnect"
	case r.Publish != nil:
		return "delivered/s, lost"
	case r.Memory != nil:
		return "RSS per session"
	}
	return "its checks"
}

// headline is a scenario's main figure and whether all its checks passed.
func headline(r *Result) (string, bool) {
	met := r.Error == ""
	for _, c := range r.Checks {
		met = met && c.Pass
	}
	switch {
	case r.Evict != nil:
		return fmt.Sprintf("max %.0f ms", r.Evict.Lag.Max), met
	case r.Reconnect != nil:
		return fmt.Sprintf("%.2f s", r.Reconnect.AllSynced), met
	case r.Publish != nil:
		return fmt.Sprintf("%s/s, %d lost", num(r.Publish.DeliveredPerSec), r.Publish.Lost), met
	case r.Memory != nil:
		return kib(r.Memory.PerSession), met
	}
	return "", met
}

// writeGoals writes the goals as a markdown table.
func writeGoals(w io.Writer, gs []Goal) {
	fmt.Fprintln(w, "| scenario | target (issue 16) | floor or baseline, same run | measured | target | met |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|")
	for _, g := range gs {
		mark := "yes"
		switch {
		case !g.Known:
			mark = "unknown"
		case !g.Met:
			mark = "**NO**"
		}
		floor := g.Floor
		if floor == "" {
			floor = "—"
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s |\n", g.Scenario, g.What, floor, g.Measured, g.Target, mark)
	}
}

// runGoals is -goals: it reads results.json and echo-floor.json from dir,
// and writes the goals table to stdout, goals.json, and results.md (the
// scenario table, the floors' rows, then the goals).
func runGoals(dir, baseline string, baselineRate float64) error {
	if dir == "" {
		return fmt.Errorf("-goals needs -out DIR (with results.json and echo-floor.json)")
	}
	var rep Report
	if err := readJSON(filepath.Join(dir, "results.json"), &rep); err != nil {
		return err
	}
	var f *Floors
	var floors Floors
	if err := readJSON(filepath.Join(dir, "echo-floor.json"), &floors); err == nil {
		f = &floors
	} else if !os.IsNotExist(err) {
		return err
	}
	var base *Baseline
	if baselineRate > 0 {
		base = &Baseline{SinglePerSec: baselineRate, From: "given"}
	} else if baseline != "" {
		var old Report
		if err := readJSON(baseline, &old); err != nil {
			return fmt.Errorf("baseline: %w", err)
		}
		base = &Baseline{Report: &old, From: fmt.Sprintf("run of %s, commit %s", old.Date, old.Commit)}
		for _, r := range old.Results {
			if p := publishOf(r); p != nil && r.Scenario.Name == "publish-single" {
				base.SinglePerSec = p.PublishedPerSec
			}
		}
	}
	pairs, err := ratePairs(filepath.Join(dir, "rate"))
	if err != nil {
		return err
	}
	if len(pairs) > 0 {
		if base == nil {
			base = &Baseline{From: "rate pairs"}
		}
		base.Pairs = pairs
	}
	gs := goals(&rep, f, base)
	var b strings.Builder
	fmt.Fprintf(&b, "Targets of issue 16, measured %s on %s, commit %s:\n\n", rep.Date, rep.Machine, rep.Commit)
	writeGoals(&b, gs)
	fmt.Print(b.String())
	if err := writeJSON(filepath.Join(dir, "goals.json"), gs); err != nil {
		return err
	}
	out, err := os.Create(filepath.Join(dir, "results.md"))
	if err != nil {
		return err
	}
	writeMarkdown(out, &rep)
	if f != nil {
		fmt.Fprintln(out, "\nThe floors, same run:\n\n| floor | measured |\n|---|---|")
		if f.Idle != nil {
			fmt.Fprint(out, f.Idle.markdown())
		}
		if f.Storm != nil {
			fmt.Fprint(out, f.Storm.markdown())
		}
		if f.HTTP != nil {
			fmt.Fprint(out, f.HTTP.markdown())
		}
	}
	fmt.Fprintln(out)
	fmt.Fprint(out, b.String())
	return out.Close()
}

func readJSON(path string, v any) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

// ceiling says how many units per second the machine's cores could make at
// the CPU per unit c measured, the server's, Postgres's and the tool's
// together since all three share the cores (whose names the runs: for the
// single-publish rate the median of this build's pair runs, which the ratio
// compares), as a multiple of ref, the baseline or floor (refName) the rate
// target is a ratio of. A target past it cannot be met on this machine without
// spending less CPU per unit. Empty when c lacks the figures.
func ceiling(c *phaseCPU, whose, unit string, ref float64, refName string) string {
	if c == nil || c.Cores <= 0 || c.MachineUS <= 0 || ref <= 0 {
		return ""
	}
	most := float64(c.Cores) * 1e6 / c.MachineUS
	return fmt.Sprintf("; %s spent %.0f µs of machine CPU per %s (server %.0f, Postgres %.0f, tool %.0f): at that, %d cores make about %s/s at most, %.2f× the %s",
		whose, c.MachineUS, unit, c.ServerUS, c.PostgresUS, c.BenchUS, c.Cores, num(most), most/ref, refName)
}

// storeShare says, beside a latency, how long the store took per group and how long calls
// queued for one (empty when the server's metrics lack them).
func storeShare(p *PublishResult) string {
	g := p.Groups
	if g == nil {
		return ""
	}
	return fmt.Sprintf("; in the store a group p50 %.1f / p99 %.1f ms, queued p99 %.1f ms", g.TookP50, g.TookP99, g.WaitP99)
}

// ratePairs reads make bench's rate pairs: dir/N-baseline/results.json and dir/N-current/results.json
// for N = 1, 2, ... while both are there (none when dir is missing).
func ratePairs(dir string) ([]RatePair, error) {
	var ps []RatePair
	for n := 1; ; n++ {
		var rp RatePair
		for _, side := range []struct {
			name string
			rate *float64
		}{{"baseline", &rp.Baseline}, {"current", &rp.Current}} {
			var rep Report
			err := readJSON(filepath.Join(dir, fmt.Sprintf("%d-%s", n, side.name), "results.json"), &rep)
			if os.IsNotExist(err) {
				return ps, nil
			}
			if err != nil {
				return nil, fmt.Errorf("rate pair %d: %w", n, err)
			}
			for _, r := range rep.Results {
				if p := publishOf(r); p != nil && r.Scenario.Name == "publish-single" {
					*side.rate = p.PublishedPerSec
					if side.name == "current" {
						rp.CurrentCPU = p.CPU
					}
				}
			}
		}
		ps = append(ps, rp)
	}
}

package main

import (
	"math"
	"slices"
	"strings"
	"testing"
	"time"
)

func near(a, b float64) bool { return math.Abs(a-b) < 1e-9 }

func TestClusterSums(t *testing.T) {
	nodes := []procSample{{CPUTick: 10}, {CPUTick: 20}, {CPUTick: 30}}
	if got := sumTicks(nodes); got != 60 {
		t.Errorf("sumTicks = %d, want 60", got)
	}
	// 60 ticks are 0.6 s of CPU: over 2,000 connects, 300 µs each.
	if got := usPerUnit(60, 2000); !near(got, 300) {
		t.Errorf("usPerUnit(60, 2000) = %v, want 300", got)
	}
	if got := usPerUnit(60, 0); got != 0 {
		t.Errorf("usPerUnit without units = %v, want 0", got)
	}
	// 150 ticks over 10 s are 15% of one core.
	if got := pctOfCore(150, 10*time.Second); !near(got, 15) {
		t.Errorf("pctOfCore(150, 10s) = %v, want 15", got)
	}
	if got := pctOfCore(150, 0); got != 0 {
		t.Errorf("pctOfCore over no time = %v, want 0", got)
	}
	if got := ratio(200, 230); !near(got, 1.15) {
		t.Errorf("ratio(200, 230) = %v, want 1.15", got)
	}
	if got := ratio(0, 5); got != 0 {
		t.Errorf("ratio over 0 = %v, want 0", got)
	}
	for _, c := range []struct {
		workers, nodes int
		want           []int
	}{{64, 3, []int{22, 21, 21}}, {64, 1, []int{64}}, {2, 3, []int{1, 1, 1}}, {6, 3, []int{2, 2, 2}}} {
		if got := splitWorkers(c.workers, c.nodes); !slices.Equal(got, c.want) {
			t.Errorf("splitWorkers(%d, %d) = %v, want %v", c.workers, c.nodes, got, c.want)
		}
	}
}

// clusterRun is a correct run with the given figures.
func clusterRun(nodes int, serverUS, perSec, pgUS, idle, published float64) *ClusterRun {
	return &ClusterRun{Nodes: nodes, LoadAvg: "1.00 1.00 1.00", StormServerUS: serverUS, IdleCPU: idle, IdleSessions: 3000, IdleSeconds: 20,
		Storm:   &ConnectResult{Sessions: 2000, PerSecond: perSec, CPU: &phaseCPU{PostgresUS: pgUS}},
		Publish: &PublishResult{Publishers: 64, PublishedPerSec: published, Expected: 100, Delivered: 100, CPU: &phaseCPU{}}}
}

func TestClusterCompare(t *testing.T) {
	one := clusterRun(1, 200, 4000, 100, 1.0, 9000)
	many := clusterRun(3, 220, 3000, 150, 2.5, 6000)
	control := clusterRun(3, 210, 3200, 100, 2.4, 7000)
	control.Separate = true
	c := compareRuns(one, control, many)
	for name, v := range map[string][2]float64{
		"connect server CPU": {c.ConnectServerCPU, 1.1},
		"connect rate":       {c.ConnectRate, 0.75},
		"connect Postgres":   {c.ConnectPostgres, 1.5},
		"idle CPU":           {c.IdleCPU, 2.5},
		"publish rate":       {c.PublishRate, 6000.0 / 9000},
		"over control":       {c.OverControl, 220.0 / 210},
	} {
		if !near(v[0], v[1]) {
			t.Errorf("%s ratio = %v, want %v", name, v[0], v[1])
		}
	}
	if c.Nodes != 3 || !c.Pass {
		t.Errorf("compare = %+v, want 3 nodes and pass (1.10 <= 1.15)", c)
	}
	var md strings.Builder
	writeClusterMarkdown(&md, &ClusterReport{Date: "d", Machine: "m", Commit: "c", Runs: []*ClusterRun{one, control, many}, Compare: c})
	for _, want := range []string{"| 1 node | control: 3 separate nodes | cluster of 3 nodes | ratio |",
		"| 200 µs | 210 µs | 220 µs | 1.10 | ratio <= 1.15 | yes |", "| 2.50 |", "cluster over the control: 1.05."} {
		if !strings.Contains(md.String(), want) {
			t.Errorf("markdown lacks %q:\n%s", want, md.String())
		}
	}

	// Over the target: not met.
	if c := compareRuns(one, nil, clusterRun(3, 240, 3000, 150, 2.5, 6000)); c.Pass || !near(c.ConnectServerCPU, 1.2) {
		t.Errorf("1.20 judged %+v, want not met", c)
	}
	// Within the target but a notification lost: not met.
	lossy := clusterRun(3, 210, 3000, 150, 2.5, 6000)
	lossy.Publish.Lost = 1
	if c := compareRuns(one, nil, lossy); c.Pass {
		t.Errorf("run with a lost notification judged met: %+v", c)
	}
	// A failed many-node run without figures: no ratios, not met.
	if c := compareRuns(one, control, &ClusterRun{Nodes: 3, Error: "node 2: exited"}); c.Pass || c.ConnectServerCPU != 0 || c.ConnectRate != 0 || c.OverControl != 0 {
		t.Errorf("failed run judged %+v", c)
	}
}

func TestClusterRounds(t *testing.T) {
	for _, c := range []struct{ procs, nodes, cores, want int }{
		{-1, 3, 2, 1}, {-1, 3, 8, 3}, {-1, 2, 2, 1}, {-1, 4, 2, 1}, {0, 3, 2, 0}, {2, 3, 2, 2},
	} {
		if got := nodeProcs(c.procs, c.nodes, c.cores); got != c.want {
			t.Errorf("nodeProcs(%d, %d nodes, %d cores) = %d, want %d", c.procs, c.nodes, c.cores, got, c.want)
		}
	}
	round := func(ratio float64) ClusterRound {
		return ClusterRound{Compare: ClusterCompare{ConnectServerCPU: ratio}}
	}
	for _, c := range []struct {
		ratios []float64
		want   int
	}{{[]float64{1.3, 1.1, 1.2}, 2}, {[]float64{1.1}, 0}, {[]float64{1.4, 0, 1.0}, 0}, {[]float64{1.2, 1.0, 1.3, 1.1}, 3}} {
		var rounds []ClusterRound
		for _, r := range c.ratios {
			rounds = append(rounds, round(r))
		}
		if got := medianRound(rounds); got != c.want {
			t.Errorf("medianRound(%v) = %d, want %d", c.ratios, got, c.want)
		}
	}

	one, control, many := clusterRun(1, 200, 4000, 100, 1, 9000), clusterRun(3, 210, 3200, 100, 2.4, 7000), clusterRun(3, 220, 3000, 150, 2.5, 6000)
	control.Separate = true
	rep := &ClusterReport{Procs: 1, Rounds: []ClusterRound{{Runs: []*ClusterRun{one, control, many}, Compare: compareRuns(one, control, many)},
		{Runs: []*ClusterRun{one, control, many}, Compare: compareRuns(one, control, many)}}}
	rep.Runs, rep.Compare = rep.Rounds[0].Runs, rep.Rounds[0].Compare
	var md strings.Builder
	writeClusterMarkdown(&md, rep)
	for _, want := range []string{"each node has GOMAXPROCS=1", "2 rounds ran interleaved", "| 2 | 200 / 210 / 220 µs | 1.10 | 1.05 | yes |"} {
		if !strings.Contains(md.String(), want) {
			t.Errorf("markdown lacks %q:\n%s", want, md.String())
		}
	}
}

package main

import (
	"math"
	"testing"
)

// TestGroupStats: the phase's figures are the deltas of the server's histograms, and the
// quantiles are read off them as histogram_quantile does.
func TestGroupStats(t *testing.T) {
	const took, wait = "notifyd_publish_group_seconds", "notifyd_publish_queue_wait_seconds"
	before := map[string]float64{
		took + `_bucket{le="0.001"}`: 5, took + `_bucket{le="0.002"}`: 5, took + `_bucket{le="0.005"}`: 5, took + `_bucket{le="+Inf"}`: 5,
		took + "_count": 5, "notifyd_publish_group_rows_sum": 50,
	}
	after := map[string]float64{
		took + `_bucket{le="0.001"}`: 15, took + `_bucket{le="0.002"}`: 65, took + `_bucket{le="0.005"}`: 104, took + `_bucket{le="+Inf"}`: 105,
		took + "_count": 105, "notifyd_publish_group_rows_sum": 1050,
		wait + `_bucket{le="0.01"}`: 100, wait + `_bucket{le="+Inf"}`: 100,
	}
	g := groupStats(before, after)
	if g == nil {
		t.Fatal("no group stats")
	}
	near := func(what string, got, want float64) {
		if math.Abs(got-want) > 1e-9 {
			t.Errorf("%s: %v, want %v", what, got, want)
		}
	}
	near("groups", g.Groups, 100)
	near("mean rows", g.MeanRows, 10)
	near("took p50", g.TookP50, 1.8) // rank 50 of 100: 40 of the 50 in (1, 2] ms
	near("took p99", g.TookP99, 5)   // rank 99: the top of (2, 5] ms, which holds 39
	near("wait p50", g.WaitP50, 5)   // every wait in [0, 10] ms
	if q := histQuantile(histDelta(before, after, took), .999); q != 0.005 {
		t.Errorf("a quantile in +Inf: %v, want the largest finite bound", q)
	}
	delete(after, wait+`_bucket{le="0.01"}`)
	delete(after, wait+`_bucket{le="+Inf"}`)
	if g := groupStats(before, after); g == nil || g.WaitP99 != 0 {
		t.Errorf("without the wait histogram: %+v, want its quantiles 0", g)
	}
	if groupStats(before, before) != nil {
		t.Error("group stats of a phase without groups")
	}
	if !math.IsNaN(histQuantile(nil, .5)) {
		t.Error("a quantile of no buckets is a number")
	}
}

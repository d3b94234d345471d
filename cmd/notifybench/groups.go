package main

import (
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"
)

// GroupStats is how the server's group commit went during a publish phase, from the deltas of
// its histograms (notifyd_publish_group_seconds, _group_rows, _queue_wait_seconds): how long
// the store took per group and how long calls queued for one, which tells the store's share of
// a request's time from the rest (HTTP, delivery, the machine).
type GroupStats struct {
	Groups   float64 `json:"groups"`
	MeanRows float64 `json:"mean_rows"`
	// TookP50 and TookP99 are a group's time in the store (statement and commit), in ms.
	TookP50 float64 `json:"took_p50_ms"`
	TookP99 float64 `json:"took_p99_ms"`
	// WaitP50 and WaitP99 are a call's wait in the queue before its group started, in ms.
	WaitP50 float64 `json:"wait_p50_ms"`
	WaitP99 float64 `json:"wait_p99_ms"`
}

// String says it in a line of the report.
func (g *GroupStats) String() string {
	return fmt.Sprintf("%s groups of %.1f rows on average; a group took p50 %.1f / p99 %.1f ms, a call queued for it p50 %.1f / p99 %.1f ms",
		num(g.Groups), g.MeanRows, g.TookP50, g.TookP99, g.WaitP50, g.WaitP99)
}

// groupStats reads GroupStats from two readings of the server's metrics; nil when the server
// has no such histograms or stored no group meanwhile.
func groupStats(before, after map[string]float64) *GroupStats {
	const took, rows, wait = "notifyd_publish_group_seconds", "notifyd_publish_group_rows", "notifyd_publish_queue_wait_seconds"
	n := after[took+"_count"] - before[took+"_count"]
	if n <= 0 {
		return nil
	}
	g := &GroupStats{Groups: n, MeanRows: (after[rows+"_sum"] - before[rows+"_sum"]) / n}
	tb := histDelta(before, after, took)
	wb := histDelta(before, after, wait)
	g.TookP50, g.TookP99 = quantileMs(tb, .5), quantileMs(tb, .99)
	g.WaitP50, g.WaitP99 = quantileMs(wb, .5), quantileMs(wb, .99)
	return g
}

// quantileMs is histQuantile of buckets in seconds, in ms, and 0 when unknown (JSON has no NaN).
func quantileMs(bs []bucket, q float64) float64 {
	v := histQuantile(bs, q)
	if math.IsNaN(v) {
		return 0
	}
	return 1000 * v
}

// bucket is one cumulative histogram bucket: count observations were <= le.
type bucket struct {
	le    float64
	count float64
}

// histDelta returns the buckets of histogram name observed between two readings, by bound.
func histDelta(before, after map[string]float64, name string) []bucket {
	prefix := name + `_bucket{le="`
	var bs []bucket
	for k, v := range after {
		bound, ok := strings.CutPrefix(k, prefix)
		if !ok {
			continue
		}
		le, err := strconv.ParseFloat(strings.TrimSuffix(bound, `"}`), 64) // "+Inf" parses as +Inf
		if err != nil {
			continue
		}
		bs = append(bs, bucket{le: le, count: v - before[k]})
	}
	sort.Slice(bs, func(i, j int) bool { return bs[i].le < bs[j].le })
	return bs
}

// histQuantile estimates the q quantile of cumulative buckets as Prometheus' histogram_quantile
// does: linearly within the bucket that holds it, from 0 for the first bucket; the largest
// finite bound when it falls in +Inf; NaN without observations.
func histQuantile(bs []bucket, q float64) float64 {
	if len(bs) == 0 || bs[len(bs)-1].count <= 0 {
		return math.NaN()
	}
	rank := q * bs[len(bs)-1].count
	lo, below := 0.0, 0.0
	for i, b := range bs {
		if b.count >= rank {
			if math.IsInf(b.le, 1) {
				if i == 0 {
					return math.NaN()
				}
				return bs[i-1].le
			}
			if b.count == below {
				return b.le
			}
			return lo + (b.le-lo)*(rank-below)/(b.count-below)
		}
		lo, below = b.le, b.count
	}
	return bs[len(bs)-1].le
}

package main

import (
	"io"
	"net/http"
	"strings"
	"testing"
	"time"
)

// /metrics carries every family registered in handlers/metrics.go: the hub's, the deliveries',
// the store's and recorder's (RegisterStore) and the dispatcher's (RegisterDispatch).
func TestMetricsRegistered(t *testing.T) {
	ts := startServer(t)
	c := ts.liveWS(t, "metrics-user")
	ts.publish(t, "metrics-user", "t", map[string]any{"n": 1})
	c.expect(t, "notification")

	var lines []string
	has := func(prefix string) bool {
		for _, l := range lines {
			if strings.HasPrefix(l, prefix) {
				return true
			}
		}
		return false
	}
	// The client can read the frame before the writer has counted it: scrape
	// until the delivery is counted (bounded).
	const delivered = `notifyd_deliveries_total{replayed="false",transport="websocket"} 1`
	for deadline := time.Now().Add(5 * time.Second); ; {
		req, _ := http.NewRequest(http.MethodGet, ts.URL+"/metrics", nil)
		req.Header.Set("Authorization", "Bearer "+testAPIKey)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		raw, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("/metrics: status %d", resp.StatusCode)
		}
		lines = strings.Split(string(raw), "\n")
		if has(delivered) || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	for _, want := range []string{
		"notifyd_published_total ",
		`notifyd_deliveries_total{replayed="false",transport="websocket"} 1`,
		`notifyd_delivery_latency_seconds_count{transport="websocket"} 1`,
		`notifyd_sessions{transport="websocket"} 1`,
		"notifyd_users_online 1",
		"notifyd_evictions_total 0",
		"notifyd_publish_statements_total ",
		"notifyd_publish_single_total ",
		"notifyd_publish_groups_total ",
		"notifyd_publish_queue_wait_seconds_count 1",
		"notifyd_publish_group_seconds_count 1",
		`notifyd_publish_group_rows_bucket{le="1"} 1`,
		"notifyd_replay_statements_total ",
		"notifyd_receipts_dropped_total 0",
		"notifyd_receipts_recorded_total ",
		"notifyd_receipts_unmatched_total ",
		`notifyd_dispatched_total{source="memory"} 1`,
		`notifyd_dispatched_total{source="db"} 0`,
		"go_goroutines ",
	} {
		if !has(want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
}

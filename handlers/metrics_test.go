package handlers

import (
	"maps"
	"testing"
	"time"

	"github.com/notifyd/notifyd/handlers/realtime"
)

// TestMetricsWritten: a write counts its live and replayed notifications by
// transport, observes the latency of the live ones only, and ignores other
// frames.
func TestMetricsWritten(t *testing.T) {
	m := NewMetrics(realtime.NewHub(realtime.Config{PingInterval: time.Second, PingTimeout: 3 * time.Second}, realtime.Hooks{}))
	ago := time.Now().Add(-time.Second)
	frames := []realtime.Frame{
		{Type: realtime.TypeNotification, Seq: 1, CreatedAt: ago, Replayed: true},
		{Type: realtime.TypeNotification, Seq: 2, CreatedAt: ago},
		{Type: realtime.TypeNotification, Seq: 3, CreatedAt: ago},
		{Type: "pong"},
	}
	m.Written(&realtime.Session{SessionInfo: realtime.SessionInfo{Transport: realtime.SSE}}, frames)
	m.Written(&realtime.Session{SessionInfo: realtime.SessionInfo{Transport: "other"}}, frames[1:2])
	fams, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	delivered := map[string]float64{}
	observed := map[string]uint64{}
	for _, f := range fams {
		for _, mt := range f.GetMetric() {
			labels := ""
			for _, l := range mt.GetLabel() {
				labels += l.GetValue() + "/"
			}
			switch f.GetName() {
			case "notifyd_deliveries_total":
				delivered[labels] = mt.GetCounter().GetValue()
			case "notifyd_delivery_latency_seconds":
				observed[labels] = mt.GetHistogram().GetSampleCount()
			}
		}
	}
	// Labels in name order: replayed, then transport.
	want := map[string]float64{"false/sse/": 2, "true/sse/": 1, "false/other/": 1, "true/other/": 0,
		"false/websocket/": 0, "true/websocket/": 0, "false/longpoll/": 0, "true/longpoll/": 0}
	if !maps.Equal(delivered, want) {
		t.Errorf("deliveries = %v, want %v", delivered, want)
	}
	if o := observed; o["sse/"] != 2 || o["other/"] != 1 || o["websocket/"] != 0 {
		t.Errorf("latency observations = %v", o)
	}
	if p50, _, _ := m.recent.percentiles(); p50 < 900 {
		t.Errorf("recent p50 = %v ms, want about 1000", p50)
	}
}

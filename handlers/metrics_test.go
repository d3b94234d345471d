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

// TestMetricsNode: RegisterNode exposes the node id as notifyd_node_info's label, the draining
// state as notifyd_draining, and both in the figures /v1/stats adds.
func TestMetricsNode(t *testing.T) {
	m := NewMetrics(realtime.NewHub(realtime.Config{PingInterval: time.Second, PingTimeout: 3 * time.Second}, realtime.Hooks{}))
	if _, ok := m.statsExtra()["node"]; ok {
		t.Fatal("node in the stats before RegisterNode")
	}
	var draining bool
	m.RegisterNode("web-7", func() bool { return draining })
	gauge := func(name string) (float64, string) {
		fams, err := m.Registry.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range fams {
			if f.GetName() == name {
				mt := f.GetMetric()[0]
				labels := ""
				for _, l := range mt.GetLabel() {
					labels += l.GetName() + "=" + l.GetValue()
				}
				return mt.GetGauge().GetValue(), labels
			}
		}
		t.Fatalf("no %s", name)
		return 0, ""
	}
	if v, l := gauge("notifyd_node_info"); v != 1 || l != "node=web-7" {
		t.Errorf("notifyd_node_info = %v {%s}", v, l)
	}
	if v, _ := gauge("notifyd_draining"); v != 0 {
		t.Errorf("notifyd_draining = %v before the drain", v)
	}
	draining = true
	if v, _ := gauge("notifyd_draining"); v != 1 {
		t.Errorf("notifyd_draining = %v while draining", v)
	}
	if x := m.statsExtra(); x["node"] != "web-7" || x["draining"] != true {
		t.Errorf("stats = %v", x)
	}
}

package main

import (
	"context"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
)

// metricValue scrapes /metrics and returns the value of the sample named
// exactly series (name and labels), 0 when it is absent.
func metricValue(t *testing.T, ts *testServer, series string) float64 {
	t.Helper()
	req, _ := http.NewRequest("GET", ts.URL+"/metrics", nil)
	req.Header.Set("Authorization", "Bearer "+testAPIKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	for _, l := range strings.Split(string(raw), "\n") {
		if v, ok := strings.CutPrefix(l, series+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("%s: %v", l, err)
			}
			return f
		}
	}
	return 0
}

// TestAckFloodCannotCrowdOutDeliveries: one WebSocket client floods 200,000
// acks of random ids while another user receives 20 notifications. Every one
// of the 20 deliveries is recorded in Postgres, the flood's acks are refused
// at the session (never sent there: none reaches the recorder) and counted,
// and the flooder's own ack of a notification it was sent is still recorded.
// It failed before: every random ack was queued to the recorder, the victim's
// deliveries were dropped behind them (notifyd_receipts_dropped_total grew), and
// no refusal was counted.
func TestAckFloodCannotCrowdOutDeliveries(t *testing.T) {
	ts := startServer(t)
	victim := ts.liveWS(t, "victim")
	flooder := ts.liveWS(t, "flooder")
	own := ts.publish(t, "flooder", "t", map[string]any{"n": 0})
	if m := flooder.expect(t, "notification"); m.ID != own.ID {
		t.Fatalf("flooder got %+v, want %s", m, own.ID)
	}
	flooder.send(t, map[string]any{"type": "ack", "ids": []string{own.ID}})
	flooder.send(t, map[string]any{"type": "ack", "ids": []string{own.ID}}) // acked already: refused

	const messages, perMessage = 200, 1000
	flooded := make(chan error, 1)
	go func() {
		ids := make([]string, perMessage)
		for range messages {
			for i := range ids {
				ids[i] = uuid.NewString()
			}
			if err := flooder.conn.WriteJSON(map[string]any{"type": "ack", "ids": ids}); err != nil {
				flooded <- err
				return
			}
		}
		flooded <- nil
	}()
	// The victim's notifications follow the flood onto the wire, while the
	// server still works through it.
	if err := <-flooded; err != nil {
		t.Fatalf("flood: %v", err)
	}
	for i := range 20 {
		p := ts.publish(t, "victim", "t", map[string]any{"n": i})
		if m := victim.expect(t, "notification"); m.ID != p.ID {
			t.Fatalf("victim got %+v, want %s", m, p.ID)
		}
	}

	pool := ts.store.Pool()
	count := func(sql string) int {
		var n int
		if err := pool.QueryRow(context.Background(), sql).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	refused := func() float64 {
		return metricValue(t, ts, `notifyd_refused_total{reason="ack_unknown"}`) +
			metricValue(t, ts, `notifyd_refused_total{reason="ack_rate"}`)
	}
	want := float64(messages*perMessage + 1)
	deadline := time.Now().Add(15 * time.Second)
	for {
		d := count(`SELECT count(*) FROM deliveries WHERE user_id = 'victim'`)
		a := count(`SELECT count(*) FROM deliveries WHERE notification_id = '` + own.ID + `' AND acked_at IS NOT NULL`)
		r := refused()
		if d == 20 && a == 1 && r == want {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of 20 deliveries recorded, own ack recorded %d of 1, %v of %v flood acks refused; receipts dropped %v",
				d, a, r, want, metricValue(t, ts, "notifyd_receipts_dropped_total"))
		}
		time.Sleep(50 * time.Millisecond)
	}
	if d := metricValue(t, ts, "notifyd_receipts_dropped_total"); d != 0 {
		t.Fatalf("%v records dropped, want 0: the refused acks must never reach the recorder", d)
	}
}

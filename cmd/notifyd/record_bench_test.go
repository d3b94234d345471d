package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

// BenchmarkRecording measures delivery throughput with delivery and receipt recording on and
// off (NOTIFY_RECORD): 100 users each connected over one WebSocket that acks every batch it
// reads; two publishers post batches of 1,000 notifications (10 per user). It reports
// delivered notifications per second, and with recording on checks that no record was dropped.
func BenchmarkRecording(b *testing.B) {
	for _, mode := range []string{"on", "off"} {
		b.Run(mode, func(b *testing.B) { benchRecording(b, mode == "off") })
	}
}

func benchRecording(b *testing.B, off bool) {
	const users, perUser, publishers = 100, 10, 2
	ts := startServer(b, func(c *Config) { c.RecordOff = off; c.QueueLimit = 4096 })
	var received atomic.Int64
	var wg sync.WaitGroup
	conns := make([]*websocket.Conn, users)
	for i := range users {
		q := url.Values{"token": {ts.token(b, fmt.Sprintf("user%d", i))}}
		conn, _, err := websocket.DefaultDialer.Dial(ts.wsURL(q), nil)
		if err != nil {
			b.Fatal(err)
		}
		conns[i] = conn
		var synced sync.WaitGroup
		synced.Add(1)
		wg.Add(1)
		go func() {
			defer wg.Done()
			var m struct {
				Type string `json:"type"`
				ID   string `json:"id"`
			}
			var ids []string
			once := false
			for {
				_, data, err := conn.ReadMessage()
				if err != nil {
					return
				}
				m.ID = ""
				if err := json.Unmarshal(data, &m); err != nil {
					return
				}
				switch m.Type {
				case "synced":
					if !once {
						once = true
						synced.Done()
					}
				case "notification":
					received.Add(1)
					ids = append(ids, m.ID)
					if len(ids) == perUser { // one ack per batch read
						if err := conn.WriteJSON(map[string]any{"type": "ack", "ids": ids}); err != nil {
							return
						}
						ids = ids[:0]
					}
				}
			}
		}()
		synced.Wait()
	}
	batch := make([]map[string]any, 0, users*perUser)
	for i := range users {
		for range perUser {
			batch = append(batch, map[string]any{"user_id": fmt.Sprintf("user%d", i), "topic": "bench", "data": map[string]int{"n": i}})
		}
	}
	body := map[string]any{"notifications": batch}

	b.ResetTimer()
	start := time.Now()
	var next atomic.Int64
	var pubs sync.WaitGroup
	for range publishers {
		pubs.Add(1)
		go func() {
			defer pubs.Done()
			for next.Add(1) <= int64(b.N) {
				if st := ts.do(b, "POST", "/v1/notifications", testAPIKey, body, nil); st != http.StatusCreated {
					b.Errorf("publish: %d", st)
					return
				}
			}
		}()
	}
	pubs.Wait()
	want := int64(b.N) * users * perUser
	deadline := time.Now().Add(2 * time.Minute)
	for received.Load() < want && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	elapsed := time.Since(start)
	b.StopTimer()
	if got := received.Load(); got < want {
		b.Fatalf("delivered %d of %d", got, want)
	}
	b.ReportMetric(float64(want)/elapsed.Seconds(), "delivered/s")
	for _, c := range conns {
		_ = c.Close()
	}
	ts.stop(b)
	wg.Wait()
	if !off {
		if d := ts.recorder.Dropped(); d != 0 {
			b.Fatalf("recorder dropped %d records", d)
		}
		b.ReportMetric(float64(ts.recorder.Recorded())/float64(b.N), "records/op")
	}
}

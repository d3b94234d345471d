package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"strings"
	"testing"
	"time"
)

// allocatedDuring returns the bytes the whole process allocated while fn ran
// (runtime.MemStats.TotalAlloc): the server runs in this process, so this is
// what it allocated to answer, plus the little the test's client needs.
func allocatedDuring(fn func()) uint64 {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	fn()
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}

// TestFanOutDoesNotCopyDataPerRecipient: a fan-out of 64 KiB data to 1,000
// users is committed with far less allocation than 1,000 × 64 KiB (62.5 MiB):
// the one data is shared by every row down to the statement. It failed before:
// the data was compacted, turned into a string and encoded once per
// recipient: 668 MiB allocated (3.9 MiB after).
func TestFanOutDoesNotCopyDataPerRecipient(t *testing.T) {
	ts := startServer(t)
	users := make([]string, 1000)
	for i := range users {
		users[i] = fmt.Sprintf("fan-%04d", i)
	}
	data := map[string]string{"blob": strings.Repeat("x", 64<<10-16)}
	body, err := json.Marshal(map[string]any{"user_ids": users, "topic": "t", "data": data})
	if err != nil {
		t.Fatal(err)
	}
	ts.publish(t, "warm-up", "t", data) // first-use allocations (pools, plans) out of the measure

	var status int
	var out struct {
		Notifications []publishedNote `json:"notifications"`
	}
	alloc := allocatedDuring(func() {
		status, out.Notifications = postFanOut(t, ts, body)
	})
	if status != http.StatusCreated || len(out.Notifications) != 1000 {
		t.Fatalf("fan-out: status %d, %d notifications", status, len(out.Notifications))
	}
	t.Logf("a 1,000-user fan-out of %d bytes of data allocated %.1f MiB", len(data["blob"]), float64(alloc)/(1<<20))
	if limit := uint64(16 << 20); alloc > limit {
		t.Fatalf("a 1,000-user fan-out of 64 KiB data allocated %.1f MiB, want < %d MiB (1,000 copies would be 62.5 MiB)",
			float64(alloc)/(1<<20), limit>>20)
	}
	var stored int
	if err := ts.store.Pool().QueryRow(t.Context(),
		`SELECT count(*) FROM notifications WHERE user_id LIKE 'fan-%' AND length(data->>'blob') = $1`, len(data["blob"])).Scan(&stored); err != nil {
		t.Fatal(err)
	}
	if stored != 1000 {
		t.Fatalf("%d of 1,000 rows hold the data", stored)
	}
}

func postFanOut(t *testing.T, ts *testServer, body []byte) (int, []publishedNote) {
	t.Helper()
	req, _ := http.NewRequest("POST", ts.URL+"/v1/notifications", bytes.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+testAPIKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out struct {
		Notifications []publishedNote `json:"notifications"`
	}
	_ = json.NewDecoder(resp.Body).Decode(&out)
	return resp.StatusCode, out.Notifications
}

// idsBody is a fan-out body of n user ids, made as it is read (so the test
// holds none of it): {"topic":"t","user_ids":["u0000000","u0000001",…]},
// 11n + 26 bytes.
type idsBody struct {
	n, next int
	buf     []byte // made and not yet read
	state   int    // 0 before the head, 1 in the ids, 2 after the tail
}

func (b *idsBody) Read(p []byte) (int, error) {
	for len(b.buf) < len(p) && b.state < 2 {
		switch {
		case b.state == 0:
			b.buf = append(b.buf, `{"topic":"t","user_ids":[`...)
			b.state = 1
		case b.next >= b.n:
			b.buf = append(b.buf, "]}"...)
			b.state = 2
		default:
			if b.next > 0 {
				b.buf = append(b.buf, ',')
			}
			var id [10]byte // "u0000000"
			id[0], id[1], id[9] = '"', 'u', '"'
			for i, v := 8, b.next; i >= 2; i, v = i-1, v/10 {
				id[i] = byte('0' + v%10)
			}
			b.buf = append(b.buf, id[:]...)
			b.next++
		}
	}
	if len(b.buf) == 0 {
		return 0, io.EOF
	}
	n := copy(p, b.buf)
	b.buf = append(b.buf[:0], b.buf[n:]...)
	return n, nil
}

// TestHugeFanOutIsRefusedWhileDecoding: fan-outs of MaxBatch+1 and of
// 3,000,000 user ids are refused with 413 batch_too_large, and the 3,000,000
// (33 MB of body) cost the server next to nothing: the count is checked while
// the array is decoded. It failed before: the whole body was decoded (and its
// ids deduplicated) before the check: 1,694 MiB allocated to refuse the
// 3,000,000 (0.4 MiB after).
func TestHugeFanOutIsRefusedWhileDecoding(t *testing.T) {
	ts := startServer(t)
	for _, n := range []int{1001, 3_000_000} {
		size := int64(11*n + 26)
		var status int
		var head string
		alloc := allocatedDuring(func() { status, head = rawPublish(t, ts, &idsBody{n: n}, size) })
		if status != http.StatusRequestEntityTooLarge || !strings.Contains(head, "batch_too_large") {
			t.Fatalf("%d ids: %d %q, want 413 batch_too_large", n, status, head)
		}
		t.Logf("%d ids (%d bytes of body) refused, allocating %.2f MiB", n, size, float64(alloc)/(1<<20))
		if limit := uint64(4 << 20); alloc > limit {
			t.Fatalf("%d ids (%d bytes of body): %.1f MiB allocated to refuse, want < %d MiB",
				n, size, float64(alloc)/(1<<20), limit>>20)
		}
	}
}

// rawPublish sends a publish of size bytes from body over a new connection
// and returns the answer's status and body. It stops writing when the server
// answers first.
func rawPublish(t *testing.T, ts *testServer, body io.Reader, size int64) (int, string) {
	t.Helper()
	conn, err := net.Dial("tcp", ts.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(60 * time.Second))
	fmt.Fprintf(conn, "POST /v1/notifications HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n",
		testAPIKey, size)
	go func() { _, _ = io.Copy(conn, body) }() // fails once the server has answered and closed
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("read the answer: %v", err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(raw)
}

// TestPublishBytesInFlightAreBounded: while one publish holds most of
// NOTIFY_PUBLISH_MAX_INFLIGHT_BYTES (its body still arriving), another that
// would overrun it is answered 429 busy with Retry-After, storing nothing;
// once the first is gone it goes through. It failed before: nothing bounded
// the publish bodies read at once (the second was 201 at once).
func TestPublishBytesInFlightAreBounded(t *testing.T) {
	ts := startServer(t, func(c *Config) { c.PublishInflightBytes = 100 << 10 })
	slow, err := net.Dial("tcp", ts.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { slow.Close() })
	fmt.Fprintf(slow, "POST /v1/notifications HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Length: %d\r\n\r\n{",
		testAPIKey, 80<<10)
	body, _ := json.Marshal(map[string]any{"user_ids": []string{"busy-a", "busy-b"}, "topic": "t",
		"data": map[string]string{"s": strings.Repeat("x", 30<<10)}})
	send := func() (int, string, http.Header) {
		req, _ := http.NewRequest("POST", ts.URL+"/v1/notifications", bytes.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+testAPIKey)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		raw, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(raw), resp.Header
	}
	// The slow request is charged once its handler has read its headers: wait
	// for that before the second publish, which would otherwise be admitted
	// first and get the slow one refused.
	deadline := time.Now().Add(30 * time.Second)
	for metricValue(t, ts, "notifyd_publish_inflight_bytes") < 80<<10 {
		if time.Now().After(deadline) {
			t.Fatal("the slow 80 KiB publish was never charged to the budget")
		}
		time.Sleep(5 * time.Millisecond)
	}
	st, raw, h := send()
	if st != http.StatusTooManyRequests || !strings.Contains(raw, `"busy"`) || h.Get("Retry-After") != "1" {
		t.Fatalf("publish beside a slow 80 KiB one within a 100 KiB budget: %d %s, Retry-After %q; want 429 busy, Retry-After 1",
			st, raw, h.Get("Retry-After"))
	}
	slow.Close()
	for {
		st, raw, _ := send()
		if st == http.StatusCreated || st == http.StatusOK {
			break
		}
		if st != http.StatusTooManyRequests || time.Now().After(deadline) {
			t.Fatalf("publish once the slow one is gone: %d %s, want 201", st, raw)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

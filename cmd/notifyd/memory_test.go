package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/notifyd/notifyd/store"
)

// fromEnv returns a config edit that takes everything LoadConfig reads from
// env (over the test's secrets) except where the server runs and logs: the
// settings under test come in as an operator sets them.
func fromEnv(t testing.TB, env map[string]string) func(*Config) {
	t.Helper()
	env["NOTIFY_JWT_SECRET"], env["NOTIFY_API_KEY"] = testSecret, testAPIKey
	loaded, err := LoadConfig(func(k string) string { return env[k] })
	if err != nil {
		t.Fatalf("config: %v", err)
	}
	return func(c *Config) {
		db, addr, logLevel, shutdown := c.DatabaseURL, c.Addr, c.LogLevel, c.ShutdownTimeout
		*c = loaded
		c.DatabaseURL, c.Addr, c.LogLevel, c.ShutdownTimeout = db, addr, logLevel, shutdown
	}
}

// storeBacklog stores count unread notifications for user straight through
// the store, each with size bytes of data; it returns their total data size.
func (ts *testServer) storeBacklog(t testing.TB, user string, count, size int) int {
	t.Helper()
	data := []byte(fmt.Sprintf(`{"p":%q}`, strings.Repeat("x", size-8)))
	for done := 0; done < count; done += 100 {
		ns := make([]store.NewNotification, min(100, count-done))
		for i := range ns {
			ns[i] = store.NewNotification{UserID: user, Topic: "big", Data: data}
		}
		if _, err := ts.store.Publish(shortCtx(t.(*testing.T)), ns); err != nil {
			t.Fatal(err)
		}
	}
	return count * len(data)
}

// allocated runs fn and returns the bytes the process allocated meanwhile
// (server and test clients together; no GC timing involved).
func allocated(fn func()) uint64 {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	fn()
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}

// leanReplay is what replayLean saw.
type leanReplay struct {
	seqs   []int64 // replayed, in order
	data   int     // bytes of their data
	synced msg
}

// replayLean connects with cursor 0 and reads the replay up to synced,
// keeping only seqs and sizes: unlike wsClient it holds no message queue, so
// what it allocates is the messages themselves.
func (ts *testServer) replayLean(t testing.TB, user string) leanReplay {
	var r leanReplay
	conn, _, err := websocket.DefaultDialer.Dial(ts.wsURL(url.Values{"token": {ts.token(t, user)}, "cursor": {"0"}}), nil)
	if err != nil {
		t.Errorf("dial: %v", err)
		return r
	}
	defer conn.Close()
	_ = conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	for {
		_, raw, err := conn.ReadMessage()
		if err != nil {
			t.Errorf("read: %v", err)
			return r
		}
		var m msg
		if err := json.Unmarshal(raw, &m); err != nil {
			t.Errorf("message: %v", err)
			return r
		}
		switch m.Type {
		case "synced":
			r.synced = m
			return r
		case "notification":
			r.seqs, r.data = append(r.seqs, m.Seq), r.data+len(m.Data)
		}
	}
}

// replayOnce connects with cursor and returns the replayed notifications and synced.
func (ts *testServer) replayOnce(t testing.TB, user string, cursor int64) ([]msg, msg) {
	t.Helper()
	c := ts.dialWS(t, user, url.Values{"cursor": {fmt.Sprint(cursor)}})
	defer c.conn.Close()
	c.expect(t, "hello")
	var got []msg
	for {
		m := c.next(t, 30*time.Second)
		switch {
		case m.Type == "synced":
			return got, m
		case m.Type == "notification" && m.Replayed:
			got = append(got, m)
		default:
			t.Fatalf("during replay: %+v", m)
		}
	}
}

// TestReplayMemoryBounded: concurrent connects of a user with a large unread
// backlog allocate a bounded amount, not the backlog once per connect:
// NOTIFY_REPLAY_MAX_BYTES cuts each replay and synced says truncated. (The
// audit's 20 connects of 3,000 unread of 60 KB took 2.2 GB.)
func TestReplayMemoryBounded(t *testing.T) {
	const (
		maxBytes = 64 << 10
		connects = 10
		count    = 200
		size     = 30 << 10
	)
	ts := startServer(t, fromEnv(t, map[string]string{"NOTIFY_REPLAY_MAX_BYTES": fmt.Sprint(maxBytes)}))
	const user = "heavy"
	backlog := ts.storeBacklog(t, user, count, size)
	results := make([]leanReplay, connects)
	total := allocated(func() {
		var wg sync.WaitGroup
		for i := range connects {
			wg.Go(func() { results[i] = ts.replayLean(t, user) })
		}
		wg.Wait()
	})
	for i, r := range results {
		if len(r.seqs) == 0 || len(r.seqs) >= count || !r.synced.Truncated || r.synced.Cursor != r.seqs[len(r.seqs)-1] {
			t.Fatalf("connect %d: %d replayed, synced %+v; want a truncated replay", i, len(r.seqs), r.synced)
		}
		for j, seq := range r.seqs {
			if seq != int64(j+1) {
				t.Fatalf("connect %d: replayed seq %d at %d", i, seq, j)
			}
		}
		if r.data > maxBytes+size {
			t.Fatalf("connect %d: %d bytes of data replayed, bound %d", i, r.data, maxBytes)
		}
	}
	// Unbounded, every connect reads and encodes the whole backlog: at least
	// connects × backlog (60 MB here) in row copies alone, as much again in
	// frames and in what the clients read.
	limit := uint64(connects*backlog) / 4
	t.Logf("%d connects of a %d KB backlog allocated %d KB (unbounded: over %d KB)", connects, backlog>>10, total>>10, connects*backlog>>10)
	if total > limit {
		t.Fatalf("%d connects allocated %d bytes, want under %d", connects, total, limit)
	}
}

// TestInboxMemoryBounded: concurrent inbox reads of a large page are
// streamed, and NOTIFY_INBOX_MAX_BYTES cuts a page (truncated); neither holds
// a page in memory once per read. (The audit's 10 reads of 1,000 took 1.7 GB.)
func TestInboxMemoryBounded(t *testing.T) {
	const (
		maxBytes = 64 << 10
		reads    = 10
		count    = 200
		size     = 30 << 10
	)
	for _, tc := range []struct {
		name     string
		maxBytes int // 0: a bound far above the page, so the whole page streams
	}{{"byte bound", maxBytes}, {"streamed", 0}} {
		t.Run(tc.name, func(t *testing.T) {
			env := map[string]string{"NOTIFY_INBOX_MAX_BYTES": fmt.Sprint(64 << 20)}
			if tc.maxBytes > 0 {
				env["NOTIFY_INBOX_MAX_BYTES"] = fmt.Sprint(tc.maxBytes)
			}
			ts := startServer(t, fromEnv(t, env))
			const user = "heavy"
			backlog := ts.storeBacklog(t, user, count, size)
			path := "/v1/users/" + user + "/notifications?limit=1000"
			// One read parsed whole: valid JSON, newest first, cut where the bound says.
			var page struct {
				Notifications []struct {
					Seq  int64           `json:"seq"`
					Data json.RawMessage `json:"data"`
				} `json:"notifications"`
				Unread    int64 `json:"unread"`
				Truncated bool  `json:"truncated"`
			}
			if st := ts.do(t, "GET", path, testAPIKey, nil, &page); st != 200 || page.Unread != count {
				t.Fatalf("inbox: %d unread %d", st, page.Unread)
			}
			for i, n := range page.Notifications {
				if n.Seq != int64(count-i) || len(n.Data) != size {
					t.Fatalf("row %d: seq %d, %d bytes of data", i, n.Seq, len(n.Data))
				}
			}
			if n := len(page.Notifications); tc.maxBytes > 0 && (n == 0 || n*size > maxBytes+size || !page.Truncated) {
				t.Fatalf("bounded page: %d rows, truncated %v", n, page.Truncated)
			} else if tc.maxBytes == 0 && (n != count || page.Truncated) {
				t.Fatalf("whole page: %d rows, truncated %v", n, page.Truncated)
			}
			// Concurrent reads, drained without parsing (the client keeps nothing).
			var wg sync.WaitGroup
			sizes := make([]int64, reads)
			total := allocated(func() {
				for i := range reads {
					wg.Go(func() { sizes[i] = ts.drain(t, path) })
				}
				wg.Wait()
			})
			for i, n := range sizes {
				if n < int64(len(page.Notifications)*size) {
					t.Fatalf("read %d: %d bytes", i, n)
				}
			}
			// Built in memory, every read holds the page at least twice
			// (rows, then their encoding): over reads × 2 × backlog. Streamed,
			// a read allocates about one row (2.6 MB for the 10 reads); the
			// bound of a whole page leaves room for -race, under which
			// sync.Pool drops some of the row buffers the driver reuses
			// (25 MB for the 10 reads).
			limit := uint64(reads*backlog) / 4
			if tc.maxBytes == 0 {
				limit = uint64(reads*backlog) / 2
			}
			t.Logf("%d reads of a %d KB page allocated %d KB (in memory: over %d KB)", reads, backlog>>10, total>>10, 2*reads*backlog>>10)
			if total > limit {
				t.Fatalf("%d reads allocated %d bytes, want under %d", reads, total, limit)
			}
		})
	}
}

// drain GETs path with the API key and discards the body; it returns its size.
func (ts *testServer) drain(t testing.TB, path string) int64 {
	req, err := http.NewRequestWithContext(context.Background(), "GET", ts.URL+path, nil)
	if err != nil {
		t.Error(err)
		return 0
	}
	req.Header.Set("Authorization", "Bearer "+testAPIKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Error(err)
		return 0
	}
	defer resp.Body.Close()
	n, err := io.Copy(io.Discard, resp.Body)
	if err != nil || resp.StatusCode != 200 {
		t.Errorf("GET %s: %d, %v", path, resp.StatusCode, err)
	}
	return n
}

// TestReplayByteCutContinues: replays cut by NOTIFY_REPLAY_MAX_BYTES, each
// followed by the documented continuation (connect again with
// cursor=synced.cursor), deliver every unread notification exactly once in
// seq order, a live one published meanwhile included (the client drops by id
// what it already has); so do inbox pages cut by NOTIFY_INBOX_MAX_BYTES,
// continued with before_seq = the last seq of the page.
func TestReplayByteCutContinues(t *testing.T) {
	ts := startServer(t, fromEnv(t, map[string]string{
		"NOTIFY_REPLAY_MAX_BYTES": "5000", "NOTIFY_INBOX_MAX_BYTES": "5000"}))
	const user = "cut"
	var want []int64
	var read []string
	for i := range 40 {
		p := ts.publish(t, user, "t", map[string]string{"p": strings.Repeat("y", (i%5)*900)})
		if i%7 == 3 {
			read = append(read, p.ID) // read: a replay skips them
		} else {
			want = append(want, p.Seq)
		}
	}
	var res struct{}
	if st := ts.do(t, "POST", "/v1/users/"+user+"/read", testAPIKey, map[string]any{"ids": read}, &res); st != 200 {
		t.Fatalf("read: %d", st)
	}

	first := ts.dialWS(t, user, url.Values{"cursor": {"0"}})
	first.expect(t, "hello")
	// got is the replays' seqs, in the order they came: with the
	// continuation, each one's replay starts above the last one's cursor.
	var got []int64
	var s msg
	for s.Type != "synced" {
		if s = first.next(t, 10*time.Second); s.Type == "notification" && s.Replayed {
			got = append(got, s.Seq)
		}
	}
	if !s.Truncated || len(got) == 0 || s.Cursor != got[len(got)-1] {
		t.Fatalf("first replay: %v then synced %+v; want a cut", got, s)
	}
	live := ts.publish(t, user, "t", map[string]string{"p": "live"})
	want = append(want, live.Seq)
	for {
		// Live ones above the cut may come first: published before the
		// connect, their commit signal can reach the session during the replay.
		m := first.expect(t, "notification")
		if m.Replayed || m.Seq <= s.Cursor {
			t.Fatalf("after a cut replay: seq %d replayed %v", m.Seq, m.Replayed)
		}
		if m.Seq == live.Seq {
			break
		}
	}
	cursor, replays := s.Cursor, 1
	for s.Truncated {
		if replays++; replays > len(want) {
			t.Fatalf("no end after %d replays", replays)
		}
		var ms []msg
		ms, s = ts.replayOnce(t, user, cursor)
		if len(ms) == 0 || ms[0].Seq <= cursor || s.Cursor != ms[len(ms)-1].Seq {
			t.Fatalf("replay from %d: %d notifications, synced cursor %d truncated %v", cursor, len(ms), s.Cursor, s.Truncated)
		}
		for _, m := range ms {
			got = append(got, m.Seq)
		}
		cursor = s.Cursor
	}
	if replays < 3 || !slices.Equal(got, want) {
		t.Fatalf("after %d replays: %v\nwant %v", replays, got, want)
	}

	// The inbox, paged down from the newest with before_seq.
	var pages int
	var inbox []int64
	before := int64(0)
	for {
		if pages++; pages > len(want) {
			t.Fatalf("no end after %d pages", pages)
		}
		var page struct {
			Notifications []struct {
				Seq int64 `json:"seq"`
			} `json:"notifications"`
			Truncated bool `json:"truncated"`
		}
		q := "?unread=true&limit=1000"
		if before > 0 {
			q += fmt.Sprintf("&before_seq=%d", before)
		}
		if st := ts.do(t, "GET", "/v1/users/"+user+"/notifications"+q, testAPIKey, nil, &page); st != 200 {
			t.Fatalf("inbox%s: %d", q, st)
		}
		for _, n := range page.Notifications {
			inbox = append(inbox, n.Seq)
		}
		if !page.Truncated {
			break
		}
		before = inbox[len(inbox)-1]
	}
	slices.Reverse(inbox)
	if pages < 3 || !slices.Equal(inbox, want) {
		t.Fatalf("%d inbox pages: %v\nwant %v", pages, inbox, want)
	}
}

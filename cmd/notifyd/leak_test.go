package main

// A server that opened and dropped 10,000 SSE (or long-poll) sessions holds
// no more goroutines or memory than before them. The SSE library leaks a
// goroutine per subscriber when a stream is removed under it, keeps an event
// log per stream, and blocks on streams nobody reads: this is the test that
// our way of using it leaves nothing behind.

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

const (
	leakSessions    = 10000
	leakWarmup      = 500
	leakConcurrency = 16
	leakUsers       = 500
	// leakHeapSlack is the heap growth tolerated over the 10,000 sessions:
	// about 400 bytes a session, while anything left behind by one holds its
	// session (a kilobyte and more). What does grow is map capacity (Go maps
	// never shrink): with every long-poll session live until swept, the
	// tracker's and the transport's maps reach 10,000 entries, about 1 MB.
	leakHeapSlack = 4 << 20
)

// The leak tests count the process's goroutines and heap, so each runs in a
// process of its own (the test binary again, with only that test selected),
// which lets the other tests run meanwhile.
func TestSSELeak(t *testing.T) {
	if !inOwnProcess(t) {
		testTransportLeak(t, "sse")
	}
}

func TestPollLeak(t *testing.T) {
	if !inOwnProcess(t) {
		testTransportLeak(t, "longpoll")
	}
}

// ownProcessEnv names, in the child process, the test it runs.
const ownProcessEnv = "NOTIFYD_TEST_OWN_PROCESS"

// inOwnProcess returns false in the child process, where the test then runs.
// Otherwise it runs the test in a child process, in parallel with the other
// tests, fails when the child fails or did not pass the test, relays the
// child's log, and returns true.
func inOwnProcess(t *testing.T) bool {
	t.Helper()
	if os.Getenv(ownProcessEnv) == t.Name() {
		return false
	}
	t.Parallel()
	cmd := exec.Command(os.Args[0], "-test.run=^"+t.Name()+"$", "-test.count=1", "-test.v", "-test.timeout=15m")
	cmd.Env = append(os.Environ(), ownProcessEnv+"="+t.Name())
	out, err := cmd.CombinedOutput()
	if err != nil || !bytes.Contains(out, []byte("--- PASS: "+t.Name()+" ")) {
		t.Fatalf("%s in its own process: %v\n%s", t.Name(), err, out)
	}
	t.Logf("%s in its own process:\n%s", t.Name(), out)
	return true
}

func testTransportLeak(t *testing.T, tr string) {
	// Long-poll sessions are dropped by no longer polling: they go when swept.
	ts := startServer(t, func(c *Config) {
		// Long enough that no session is evicted before its first answer,
		// even on a loaded machine under -race.
		c.PingInterval = time.Second
		c.PingTimeout = 3 * time.Second
	})
	tokens := make([]string, leakUsers)
	for i := range tokens {
		tokens[i] = ts.token(t, fmt.Sprintf("leak-%d", i))
	}
	client := &leakClient{ts: ts, tokens: tokens,
		http: &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: leakConcurrency}}}
	defer client.http.CloseIdleConnections()

	run := func(n int) {
		t.Helper()
		if err := forEach(n, leakConcurrency, func(i int) error { return client.openAndDrop(tr, i) }); err != nil {
			t.Fatal(err)
		}
	}
	settle := func() {
		t.Helper()
		client.http.CloseIdleConnections()
		eventually(t, 30*time.Second, "every session gone", func() bool { return ts.statsNow(t).Sessions == 0 })
		if tr == "longpoll" {
			// An evicted long-poll session's bye is kept for one ping timeout.
			time.Sleep(ts.Config.PingTimeout + 500*time.Millisecond)
		}
	}

	// Warm up: pools, maps and buffers reach their working size.
	run(leakWarmup)
	settle()
	baseGoroutines := goleak.IgnoreCurrent()
	heapBefore := heapInUse()
	before := runtime.NumGoroutine()

	start := time.Now()
	run(leakSessions)
	took := time.Since(start)
	settle()

	// pgx starts a background reader on pool connections opened meanwhile.
	pgx := goleak.IgnoreAnyFunction("github.com/jackc/pgx/v5/pgconn/internal/bgreader.(*BGReader).bgRead")
	if err := goleak.Find(baseGoroutines, pgx); err != nil {
		t.Fatalf("goroutines left after %d %s sessions: %v", leakSessions, tr, err)
	}
	heapAfter := heapInUse()
	t.Logf("%d %s sessions in %s; goroutines %d -> %d; heap in use %d -> %d bytes (%+d)",
		leakSessions, tr, took.Round(time.Millisecond), before, runtime.NumGoroutine(),
		heapBefore, heapAfter, int64(heapAfter)-int64(heapBefore))
	if heapAfter > heapBefore+leakHeapSlack {
		t.Fatalf("heap in use grew by %d bytes over %d %s sessions (more than %d)",
			heapAfter-heapBefore, leakSessions, tr, leakHeapSlack)
	}
	st := ts.statsNow(t)
	if st.Sessions != 0 || st.Users != 0 {
		t.Fatalf("stats after: %+v", st)
	}
	want := int64(leakSessions + leakWarmup)
	if tr == "longpoll" && st.Evictions != want {
		t.Fatalf("evictions = %d, want %d (every long-poll session swept)", st.Evictions, want)
	}
}

// heapInUse is the live heap after a full collection (HeapAlloc: the bytes
// of reachable objects, which fragmentation does not inflate).
func heapInUse() uint64 {
	var ms runtime.MemStats
	for range 3 {
		runtime.GC()
	}
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// leakClient opens a session, reads it up to synced, and drops it.
type leakClient struct {
	ts     *testServer
	tokens []string
	http   *http.Client
}

func (c *leakClient) openAndDrop(tr string, i int) error {
	token := c.tokens[i%len(c.tokens)]
	switch tr {
	case "sse":
		return c.sse(token)
	case "longpoll":
		_, reply, _, err := c.ts.pollOnceWith(c.http, token, url.Values{})
		if err != nil {
			return err
		}
		if n := len(reply.Messages); n < 2 || reply.Messages[n-1].Type != "synced" {
			return fmt.Errorf("first poll: %+v", reply)
		}
		return nil
	}
	return fmt.Errorf("unknown transport %q", tr)
}

// sse speaks HTTP/1.1 on a raw connection, reads the stream up to synced and
// closes the connection, as a tab that goes away does.
func (c *leakClient) sse(token string) error {
	conn, err := net.DialTimeout("tcp", strings.TrimPrefix(c.ts.URL, "http://"), 5*time.Second)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := fmt.Fprintf(conn, "GET /v1/sse?token=%s HTTP/1.1\r\nHost: notifyd\r\nAccept: text/event-stream\r\n\r\n", token); err != nil {
		return err
	}
	br := bufio.NewReader(conn)
	status, err := br.ReadString('\n')
	if err != nil {
		return err
	}
	if !strings.Contains(status, " 200 ") {
		return fmt.Errorf("status %q", strings.TrimSpace(status))
	}
	for {
		line, err := br.ReadString('\n')
		if err == io.EOF {
			return fmt.Errorf("stream ended before synced")
		}
		if err != nil {
			return err
		}
		if strings.HasPrefix(line, "event: synced") {
			return nil
		}
		if strings.HasPrefix(line, "event: bye") {
			return fmt.Errorf("bye before synced")
		}
	}
}

// pollOnceWith is pollOnce on a given HTTP client.
func (ts *testServer) pollOnceWith(client *http.Client, token string, q url.Values) (int, pollReply, http.Header, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	return ts.pollOnceClient(ctx, client, token, q)
}

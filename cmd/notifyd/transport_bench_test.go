package main

// Benchmarks of the three transports side by side: the server's memory per
// idle session (the clients run in a child process, so only the server is
// measured) and the delivery latency of one notification at a time.

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/notifyd/notifyd/handlers"
)

// idleSessions is how many idle sessions the memory benchmark holds.
const idleSessions = 5000

// Environment of the child process that holds the idle sessions.
const (
	benchClientEnv = "NOTIFYD_BENCH_CLIENT"
	benchURLEnv    = "NOTIFYD_BENCH_URL"
	benchCountEnv  = "NOTIFYD_BENCH_COUNT"
)

// BenchmarkIdleSessionMemory reports the server's heap and goroutine stacks
// per idle session: each session has said hello and synced, and (long-poll)
// has its next poll waiting, as a real client keeps one. Run with
// -benchtime=1x: every run opens idleSessions sessions.
func BenchmarkIdleSessionMemory(b *testing.B) {
	for _, tr := range allTransports {
		b.Run(tr, func(b *testing.B) {
			for range b.N {
				ts := startServer(b)
				m := measureIdle(b, ts, tr, idleSessions)
				b.ReportMetric(m.heap+m.stack, "B/session")
				b.ReportMetric(m.heap, "heap-B/session")
				b.ReportMetric(m.stack, "stack-B/session")
				b.ReportMetric(m.goroutines, "goroutines/session")
			}
		})
	}
}

// idleCost is what one idle session costs the server.
type idleCost struct {
	heap, stack, goroutines float64
}

// measureIdle opens n idle sessions of tr from a child process and returns
// the server's live heap, goroutine stack bytes and goroutines per session.
func measureIdle(b *testing.B, ts *testServer, tr string, n int) idleCost {
	b.Helper()
	return measureIdleChild(b, "TestTransportBenchClient", n,
		[]string{benchClientEnv + "=" + tr, benchURLEnv + "=" + ts.URL, benchCountEnv + "=" + strconv.Itoa(n)},
		func() int64 { return ts.statsNow(b).ByTransport[tr] })
}

// measureIdleChild runs the test run of this binary as the client process
// (with env added), which opens n sessions, prints "ready" and holds them
// until its stdin closes; live must then count n sessions. It returns what
// each session costs the server: live heap, goroutine stacks, goroutines.
func measureIdleChild(b *testing.B, run string, n int, env []string, live func() int64) idleCost {
	b.Helper()
	before := serverMemory()
	cmd := exec.Command(os.Args[0], "-test.run=^"+run+"$", "-test.timeout=10m")
	cmd.Env = append(os.Environ(), env...)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() {
		_ = stdin.Close() // the child exits when its stdin closes
		_ = cmd.Wait()
	}()
	lines := bufio.NewScanner(stdout)
	ready := false
	for lines.Scan() {
		if strings.HasPrefix(lines.Text(), "ready") {
			ready = true
			break
		}
	}
	if !ready {
		b.Fatalf("the client process (%s %v) did not get %d sessions ready", run, env, n)
	}
	go func() { _, _ = io.Copy(io.Discard, stdout) }()
	if got := live(); got != int64(n) {
		b.Fatalf("%d sessions live, want %d (%v)", got, n, env)
	}
	time.Sleep(time.Second) // let the last polls reach the server and settle
	after := serverMemory()
	per := func(a, b uint64) float64 { return (float64(a) - float64(b)) / float64(n) }
	return idleCost{heap: per(after.heap, before.heap), stack: per(after.stack, before.stack),
		goroutines: per(after.goroutines, before.goroutines)}
}

type memSample struct{ heap, stack, goroutines uint64 }

// serverMemory is the live heap and goroutine stacks after a collection, and
// the goroutine count.
func serverMemory() memSample {
	var ms runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&ms)
	return memSample{heap: ms.HeapAlloc, stack: ms.StackInuse, goroutines: uint64(runtime.NumGoroutine())}
}

// TestTransportBenchClient is the child process of BenchmarkIdleSessionMemory:
// it opens the sessions, prints "ready", and holds them until stdin closes.
func TestTransportBenchClient(t *testing.T) {
	tr := os.Getenv(benchClientEnv)
	if tr == "" {
		t.Skip("only run as the benchmark's client process")
	}
	base := os.Getenv(benchURLEnv)
	n, err := strconv.Atoi(os.Getenv(benchCountEnv))
	if err != nil {
		t.Fatal(err)
	}
	auth := handlers.NewAuth(testSecret, testAPIKey, nil)
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: n}}
	err = forEach(n, 32, func(i int) error {
		tok, err := auth.NewToken(fmt.Sprintf("idle-%d", i), "bench", time.Hour)
		if err != nil {
			return err
		}
		return holdSession(client, base, tr, tok)
	})
	if err != nil {
		t.Fatal(err)
	}
	fmt.Println("ready")
	_, _ = io.Copy(io.Discard, os.Stdin)
}

// holdSession opens one session, waits for synced and keeps it open in the
// background (reading, answering pings, or with a poll waiting).
func holdSession(client *http.Client, base, tr, token string) error {
	switch tr {
	case "websocket":
		conn, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(base, "http")+"/v1/ws?token="+token, nil)
		if err != nil {
			return err
		}
		for {
			var m msg
			if err := conn.ReadJSON(&m); err != nil {
				return err
			}
			if m.Type == "synced" {
				break
			}
		}
		go func() {
			for {
				if _, _, err := conn.ReadMessage(); err != nil {
					return
				}
			}
		}()
		return nil
	case "sse":
		resp, err := client.Get(base + "/v1/sse?token=" + token)
		if err != nil {
			return err
		}
		if resp.StatusCode != http.StatusOK {
			resp.Body.Close()
			return fmt.Errorf("status %d", resp.StatusCode)
		}
		br := bufio.NewReader(resp.Body)
		for {
			line, err := br.ReadString('\n')
			if err != nil {
				return err
			}
			if strings.HasPrefix(line, "event: synced") {
				break
			}
		}
		go func() { _, _ = io.Copy(io.Discard, br); resp.Body.Close() }()
		return nil
	case "longpoll":
		ts := &testServer{URL: base}
		_, reply, _, err := ts.pollOnceClient(context.Background(), client, token, url.Values{})
		if err != nil {
			return err
		}
		go func() {
			q := url.Values{"session": {reply.Session}, "cursor": {strconv.FormatInt(reply.Cursor, 10)}, "wait": {"60"}}
			for {
				_, r, _, err := ts.pollOnceClient(context.Background(), client, token, q)
				if err != nil {
					return
				}
				q.Set("cursor", strconv.FormatInt(r.Cursor, 10))
			}
		}()
		return nil
	}
	return fmt.Errorf("unknown transport %q", tr)
}

// BenchmarkDeliveryLatency publishes one notification at a time through the
// API and measures until the client of each transport has it (end to end:
// the publish's commit, LISTEN/NOTIFY, the fetch and the transport). It also
// reports the server's own commit-to-write latency (GET /v1/stats).
func BenchmarkDeliveryLatency(b *testing.B) {
	for _, tr := range allTransports {
		b.Run(tr, func(b *testing.B) {
			ts := startServer(b)
			c := ts.dialTransport(b, tr, "lat", nil)
			c.expect(b, "hello")
			c.expect(b, "synced")
			lat := make([]time.Duration, 0, b.N)
			b.ResetTimer()
			for i := range b.N {
				start := time.Now()
				var p publishedNote
				if st := ts.do(b, "POST", "/v1/notifications", testAPIKey, map[string]any{"user_id": "lat", "topic": "bench", "data": map[string]int{"i": i}}, &p); st != http.StatusCreated {
					b.Fatalf("publish: %d", st)
				}
				for {
					m := c.next(b, 10*time.Second)
					if m.Type == "notification" && m.ID == p.ID {
						break
					}
				}
				lat = append(lat, time.Since(start))
			}
			b.StopTimer()
			slices.Sort(lat)
			pct := func(p float64) float64 { return float64(lat[int(p*float64(len(lat)-1))].Microseconds()) / 1000 }
			b.ReportMetric(pct(0.5), "p50-ms")
			b.ReportMetric(pct(0.99), "p99-ms")
			var stats struct {
				LatencyMs map[string]float64 `json:"latency_ms"`
			}
			if st := ts.do(b, "GET", "/v1/stats", testAPIKey, nil, &stats); st == http.StatusOK && stats.LatencyMs != nil {
				b.ReportMetric(stats.LatencyMs["p50"], "server-p50-ms")
				b.ReportMetric(stats.LatencyMs["p99"], "server-p99-ms")
			}
		})
	}
}

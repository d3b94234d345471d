package main

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/notifyd/notifyd/store/storetest"
)

// buildServer builds cmd/notifyd into a temporary directory.
func buildServer(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "notifyd")
	cmd := exec.Command("go", "build", "-o", bin, "../notifyd")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build notifyd: %v\n%s", err, out)
	}
	return bin
}

// hasRoute reports whether a spawned server serves path (401 without a
// token) rather than 404: the SSE and long-poll transports may not exist yet.
func hasRoute(t *testing.T, tg *target, path string) bool {
	resp, err := http.Get(tg.URL + path)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode != http.StatusNotFound && resp.StatusCode != http.StatusMethodNotAllowed
}

// TestTinyScenario runs a small scenario of every phase against a real
// notifyd started as a child process, and checks that the tool measured
// something and judged delivery, replay, reconnect and eviction correct.
func TestTinyScenario(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a server")
	}
	bin := buildServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cfg := runConfig{bin: bin, baseDB: storetest.BaseURL(), sources: loopbackSources(3), outDir: t.TempDir(),
		log: slog.New(slog.NewTextHandler(io.Discard, nil))}

	// Probe which transports this server has.
	probe, err := spawnServer(ctx, bin, cfg.baseDB, "", serverSettings{PingInterval: time.Second, PingTimeout: 4 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	sse, poll := hasRoute(t, probe, "/v1/sse"), hasRoute(t, probe, "/v1/poll")
	probe.stop()

	sc := Scenario{Name: "tiny", WS: 12, Unread: 2, PingInterval: time.Second, PingTimeout: 4 * time.Second,
		RSS: true, Idle: 500 * time.Millisecond, Publish: publishBatch, Publishers: 2, Batch: 10, PublishFor: 700 * time.Millisecond,
		Reconnect: 4, ReconnectUnread: 3, ReconnectWithin: 200 * time.Millisecond, Silent: 3,
		Targets: Targets{MaxEvictLagMs: 1000}, settle: 200 * time.Millisecond}
	if sse {
		sc.SSE = 4
	}
	if poll {
		sc.Poll = 4
	}
	t.Logf("sse %v, long-poll %v", sse, poll)
	r := runScenario(ctx, cfg, sc)
	for _, c := range r.Checks {
		t.Logf("%s: %s (target %s) pass=%v", c.What, c.Measured, c.Target, c.Pass)
		if !c.Pass {
			t.Errorf("check failed: %s: %s", c.What, c.Measured)
		}
	}
	if r.Error != "" {
		t.Fatalf("run: %s", r.Error)
	}
	if r.Connect == nil || r.Connect.Errors != 0 || r.Connect.ReplayBad != 0 {
		t.Fatalf("connect: %+v", r.Connect)
	}
	if r.Memory == nil || r.Memory.SettledRSS <= 0 || r.Memory.ServerFDs < sc.sessions() {
		t.Errorf("memory: %+v", r.Memory)
	}
	if r.IdleCPU == nil {
		t.Error("no idle CPU measured")
	}
	p := r.Publish
	if p == nil || p.Committed == 0 || p.Delivered != p.Expected || p.Lost != 0 || p.Latency.N == 0 {
		t.Fatalf("publish: %+v", p)
	}
	if p.ReadBack < 0 || p.ReadBack > 1 {
		t.Errorf("read-back share %v: the server's dispatch metrics were not read", p.ReadBack)
	}
	if rc := r.Reconnect; rc == nil || rc.Errors != 0 || rc.ReplayBad != 0 || rc.AllSynced <= 0 {
		t.Errorf("reconnect: %+v", rc)
	}
	if e := r.Evict; e == nil || e.Evicted != sc.Silent || e.OthersLost != 0 {
		t.Errorf("evict: %+v", r.Evict)
	}

	var md strings.Builder
	writeMarkdown(&md, &Report{Date: today(), Machine: machine(), Commit: "test", Results: []*Result{r}})
	if !strings.Contains(md.String(), "| **tiny**") || !strings.Contains(md.String(), "delivered/s") {
		t.Errorf("markdown:\n%s", md.String())
	}
}

// TestReadBack: the share comes from the metric deltas, and is unknown
// without them or without dispatches.
func TestReadBack(t *testing.T) {
	const db, mem = `notifyd_dispatched_total{source="db"}`, `notifyd_dispatched_total{source="memory"}`
	before := map[string]float64{db: 10, mem: 100}
	if got := readBack(before, map[string]float64{db: 30, mem: 160}); got != 0.25 {
		t.Errorf("readBack = %v, want 0.25", got)
	}
	if got := readBack(before, map[string]float64{}); got != -1 {
		t.Errorf("without metrics: %v, want -1", got)
	}
	if got := readBack(before, before); got != -1 {
		t.Errorf("without dispatches: %v, want -1", got)
	}
}

// TestReadEvents parses an event stream with keep-alives, CRLF lines and a
// multi-line data field.
func TestReadEvents(t *testing.T) {
	in := ": ka\r\n\r\nevent: hello\r\nid: 0\r\ndata: {\"type\":\"hello\"}\r\n\r\n" +
		"event: notification\nid: 3\ndata: {\"type\":\ndata: \"notification\"}\n\n: ka\n\n"
	var got []string
	err := readEvents(strings.NewReader(in), func(b []byte, _ time.Time) { got = append(got, string(b)) })
	if err != io.EOF {
		t.Fatalf("err %v", err)
	}
	want := []string{`{"type":"hello"}`, "{\"type\":\n\"notification\"}"}
	if len(got) != 2 || got[0] != want[0] || got[1] != want[1] {
		t.Fatalf("got %q, want %q", got, want)
	}
}

// TestSessionChecks feeds a session messages in and out of order and checks
// what it counts as a gap, a duplicate and a bad replay.
func TestSessionChecks(t *testing.T) {
	b := &bench{byes: map[string]int{}}
	s := &session{b: b, syncedCh: make(chan struct{})}
	feed := func(m string) { s.handle([]byte(m), time.Now()) }
	feed(`{"type":"hello","session":"S1"}`)
	feed(`{"type":"notification","seq":1,"replayed":true}`)
	feed(`{"type":"notification","seq":2,"replayed":true}`)
	feed(`{"type":"synced","cursor":2}`)
	feed(`{"type":"notification","seq":3,"replayed":false,"data":{"t":1}}`)
	feed(`{"type":"notification","seq":3,"replayed":false}`)
	feed(`{"type":"notification","seq":6,"replayed":false}`)
	feed(`{"type":"bye","reason":"kicked"}`)
	if s.id != "S1" || s.replayed != 2 || !s.synced || s.replayBad != "" {
		t.Fatalf("replay: id %q replayed %d synced %v bad %q", s.id, s.replayed, s.synced, s.replayBad)
	}
	if s.live != 2 || s.dups != 1 || s.gaps != 2 || s.cursor != 6 || b.received.Load() != 2 {
		t.Fatalf("live %d dups %d gaps %d cursor %d received %d", s.live, s.dups, s.gaps, s.cursor, b.received.Load())
	}
	if b.byes["kicked"] != 1 || s.byeReason != "kicked" {
		t.Fatalf("bye: %v", b.byes)
	}
	s2 := &session{b: b, syncedCh: make(chan struct{})}
	s2.handle([]byte(`{"type":"notification","seq":2,"replayed":true}`), time.Now())
	s2.handle([]byte(`{"type":"synced","cursor":2}`), time.Now())
	if s2.replayBad == "" {
		t.Fatal("a replay that skipped seq 1 was not flagged")
	}
}

// TestFloors runs small storm and HTTP floors against the bare server
// (a notifybench binary built for the test): each must have measured
// connects or requests, without errors, and the CPU they cost.
func TestFloors(t *testing.T) {
	echoBinary = filepath.Join(t.TempDir(), "notifybench")
	if out, err := exec.Command("go", "build", "-o", echoBinary, ".").CombinedOutput(); err != nil {
		t.Fatalf("build notifybench: %v\n%s", err, out)
	}
	t.Cleanup(func() { echoBinary = "" })
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	st, err := stormFloor(ctx, 300, 16, loopbackSources(3))
	if err != nil {
		t.Fatal(err)
	}
	if st.Errors != 0 || st.PerSecond <= 0 || st.CPU.ServerUS <= 0 || st.CPU.BenchUS <= 0 {
		t.Errorf("storm floor: %+v, cpu %+v", st, st.CPU)
	}
	hf, err := httpFloor(ctx, 4, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if hf.Errors != 0 || hf.PerSecond <= 0 || hf.CPU.ServerUS <= 0 || hf.Latency.P50 <= 0 {
		t.Errorf("http floor: %+v, cpu %+v", hf, hf.CPU)
	}
	t.Logf("%s%s", st.markdown(), hf.markdown())
}

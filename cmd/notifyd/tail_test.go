package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// tailOutput collects tail's output lines.
type tailOutput struct {
	mu    sync.Mutex
	part  []byte
	lines chan string
}

func newTailOutput() *tailOutput { return &tailOutput{lines: make(chan string, 1024)} }

func (o *tailOutput) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.part = append(o.part, p...)
	for {
		i := bytes.IndexByte(o.part, '\n')
		if i < 0 {
			return len(p), nil
		}
		o.lines <- string(o.part[:i])
		o.part = o.part[i+1:]
	}
}

// next returns tail's next message line (reconnect notes, starting with #,
// are skipped) as its type and message.
func (o *tailOutput) next(t *testing.T) (string, msg) {
	t.Helper()
	for {
		select {
		case l := <-o.lines:
			if strings.HasPrefix(l, "#") {
				continue
			}
			typ, raw, ok := strings.Cut(l, " ")
			var m msg
			if !ok || json.Unmarshal([]byte(raw), &m) != nil || m.Type != typ {
				t.Fatalf("tail printed %q: want one message per line, its type then its JSON", l)
			}
			return typ, m
		case <-time.After(10 * time.Second):
			t.Fatal("tail printed nothing within 10s")
			return "", msg{}
		}
	}
}

// expect reads the next line and fails unless it is a typ message.
func (o *tailOutput) expect(t *testing.T, typ string) msg {
	t.Helper()
	got, m := o.next(t)
	if got != typ {
		t.Fatalf("tail printed a %s message %+v, want %s", got, m, typ)
	}
	return m
}

// startTail runs `notifyd tail` with args until the test ends.
func startTail(t *testing.T, args ...string) (*tailOutput, func() error) {
	t.Helper()
	out := newTailOutput()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	getenv := func(k string) string {
		if k == "NOTIFY_JWT_SECRET" {
			return testSecret
		}
		return ""
	}
	go func() { done <- runTail(ctx, args, getenv, out) }()
	var once sync.Once
	var err error
	stop := func() error {
		once.Do(func() {
			cancel()
			select {
			case err = <-done:
			case <-time.After(10 * time.Second):
				t.Error("tail did not stop within 10s of its context")
			}
		})
		return err
	}
	t.Cleanup(func() { _ = stop() })
	return out, stop
}

// TestTail: `notifyd tail` prints, one line each, what the user receives:
// hello, the unread backlog, synced, then live notifications in order. It
// pings, so it outlives the ping timeout; after a kick (bye, a clean end of
// the response) it connects again above what it printed, repeating nothing.
func TestTail(t *testing.T) {
	ts := startServer(t, func(c *Config) { c.PingInterval = time.Second; c.PingTimeout = 3 * time.Second })
	before := ts.publish(t, "tail-alice", "before", map[string]int{"n": 0})
	out, stop := startTail(t, "-user", "tail-alice", "-url", ts.URL)
	hello := out.expect(t, "hello")
	if hello.Transport != "sse" || hello.User != "tail-alice" {
		t.Fatalf("hello %+v", hello)
	}
	if m := out.expect(t, "notification"); m.Seq != before.Seq || !m.Replayed {
		t.Fatalf("replay %+v", m)
	}
	out.expect(t, "synced")
	var seqs []int64
	for i := 1; i <= 3; i++ {
		seqs = append(seqs, ts.publish(t, "tail-alice", "live", map[string]int{"n": i}).Seq)
	}
	for i, seq := range seqs {
		if m := out.expect(t, "notification"); m.Seq != seq || m.Replayed || !jsonSame(m.Data, `{"n":`+strconv.Itoa(i+1)+`}`) {
			t.Fatalf("live %d: %+v, want seq %d", i, m, seq)
		}
	}

	// Past the 3 s ping timeout, its pings keep it alive.
	time.Sleep(4 * time.Second)
	if s := ts.sessionsOf(t, "tail-alice"); len(s) != 1 || s[0].ID != hello.Session {
		t.Fatalf("sessions after the ping timeout: %+v", s)
	}

	if st := ts.do(t, "DELETE", "/v1/sessions/"+hello.Session, testAPIKey, nil, nil); st != 204 {
		t.Fatalf("kick: %d", st)
	}
	if bye := out.expect(t, "bye"); bye.Reason != "kicked" {
		t.Fatalf("bye %+v", bye)
	}
	if again := out.expect(t, "hello"); again.Session == hello.Session {
		t.Fatalf("reconnected into the kicked session: %+v", again)
	}
	if m := out.expect(t, "synced"); m.Cursor != seqs[2] {
		t.Fatalf("synced after the reconnect %+v, want cursor %d (nothing replayed)", m, seqs[2])
	}
	last := ts.publish(t, "tail-alice", "after", nil)
	if m := out.expect(t, "notification"); m.Seq != last.Seq {
		t.Fatalf("after the reconnect %+v", m)
	}
	if err := stop(); err != nil {
		t.Fatalf("tail ended with %v", err)
	}
}

// TestTailCursorAndTLS: -cursor starts above a seq; over an https URL
// (-cacert) tail reads the stream over HTTP/2, through the SSE library.
func TestTailCursorAndTLS(t *testing.T) {
	s := startTLSServer(t)
	var seqs []int64
	for i := range 3 {
		seqs = append(seqs, s.publish(t, "tail-bob", "t", map[string]int{"n": i}).Seq)
	}
	ca := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(ca, s.cert.certPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	out, _ := startTail(t, "-user", "tail-bob", "-url", s.URL, "-cacert", ca, "-cursor", strconv.FormatInt(seqs[0], 10))
	out.expect(t, "hello")
	for _, seq := range seqs[1:] {
		if m := out.expect(t, "notification"); m.Seq != seq || !m.Replayed {
			t.Fatalf("replay %+v, want seq %d", m, seq)
		}
	}
	out.expect(t, "synced")
	live := s.publish(t, "tail-bob", "live", nil)
	if m := out.expect(t, "notification"); m.Seq != live.Seq {
		t.Fatalf("live %+v", m)
	}
	// Over HTTP/2: served through the SSE library.
	if n := libraryStreams(); n != 1 {
		t.Fatalf("%d streams through the SSE library, want tail's one", n)
	}
	// The stream is one of the server's SSE sessions, tail's own device.
	eventually(t, 5*time.Second, "tail's session recorded", func() bool {
		return s.scalar(t, `SELECT count(*) FROM session_history WHERE user_id = 'tail-bob' AND transport = 'sse' AND device = 'notifyd-tail'`) == 1
	})
}

// TestTailRefused: a token the server refuses ends tail with the server's
// error, and bad flags are refused before connecting.
func TestTailRefused(t *testing.T) {
	ts := startServer(t)
	out := newTailOutput()
	getenv := func(string) string { return "another-secret-0123456789" }
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := runTail(ctx, []string{"-user", "tail-carol", "-url", ts.URL}, getenv, out)
	if err == nil || !strings.Contains(err.Error(), "401") {
		t.Fatalf("wrong secret: %v", err)
	}
	for _, args := range [][]string{{"-user", "bad user"}, {"-user", "ok", "-cursor", "-1"}} {
		if err := runTail(ctx, args, getenv, out); err == nil {
			t.Errorf("%v: no error", args)
		}
	}
	if err := runTail(ctx, []string{"-user", "ok"}, func(string) string { return "" }, out); err == nil || !strings.Contains(err.Error(), "NOTIFY_JWT_SECRET") {
		t.Errorf("no secret: %v", err)
	}
}

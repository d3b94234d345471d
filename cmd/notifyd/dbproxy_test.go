package main

// Postgres unreachable: a TCP proxy between the server and Postgres that can be cut.

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"net/http"
	"net/url"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/notifyd/notifyd/store"
	"github.com/notifyd/notifyd/store/storetest"
)

// pgProxy forwards TCP connections to Postgres until it is cut: then every open connection
// is closed and new ones are accepted and closed at once (the server sees Postgres go away).
type pgProxy struct {
	ln     net.Listener
	target string

	mu    sync.Mutex
	cut   bool
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
	// While held, bytes of every connection but the server's LISTEN connection wait in the
	// proxy (queries hang); resume is closed when the hold ends.
	held   bool
	resume chan struct{}
}

// proxiedConn is one forwarded connection; listener is set from its startup message.
type proxiedConn struct {
	listener atomic.Bool
}

// startPGProxy listens on 127.0.0.1:0 and forwards to target; it is closed at cleanup.
func startPGProxy(t testing.TB, target string) *pgProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &pgProxy{ln: ln, target: target, conns: map[net.Conn]struct{}{}}
	p.wg.Add(1)
	go p.serve()
	t.Cleanup(func() {
		_ = ln.Close()
		p.hold(false)
		p.setCut(true)
		p.wg.Wait()
	})
	return p
}

func (p *pgProxy) serve() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		cut := p.cut
		p.mu.Unlock()
		if cut {
			_ = c.Close()
			continue
		}
		up, err := net.DialTimeout("tcp", p.target, 5*time.Second)
		if err != nil {
			_ = c.Close()
			continue
		}
		p.mu.Lock()
		if p.cut {
			p.mu.Unlock()
			_ = c.Close()
			_ = up.Close()
			continue
		}
		p.conns[c], p.conns[up] = struct{}{}, struct{}{}
		p.mu.Unlock()
		pc := &proxiedConn{}
		p.wg.Add(2)
		go p.pipe(up, c, pc, true)
		go p.pipe(c, up, pc, false)
	}
}

// pipe copies from src to dst (toServer: the client's side); when either side ends both are
// closed. The client's first bytes (the startup message) tell whether it is the LISTEN
// connection, by its application_name.
func (p *pgProxy) pipe(dst, src net.Conn, pc *proxiedConn, toServer bool) {
	defer p.wg.Done()
	listenerName := []byte("application_name\x00" + store.ListenerAppName + "\x00")
	buf := make([]byte, 32<<10)
	for first := true; ; first = false {
		n, err := src.Read(buf)
		if n > 0 {
			if first && toServer && bytes.Contains(buf[:n], listenerName) {
				pc.listener.Store(true)
			}
			if !pc.listener.Load() {
				p.waitHold()
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				break
			}
		}
		if err != nil {
			break
		}
	}
	_ = dst.Close()
	_ = src.Close()
	p.mu.Lock()
	delete(p.conns, dst)
	delete(p.conns, src)
	p.mu.Unlock()
}

// waitHold returns once the path is not held.
func (p *pgProxy) waitHold() {
	p.mu.Lock()
	held, resume := p.held, p.resume
	p.mu.Unlock()
	if held {
		<-resume
	}
}

// hold holds back (true) or releases (false) the traffic of every connection but LISTEN's.
func (p *pgProxy) hold(on bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case on && !p.held:
		p.held, p.resume = true, make(chan struct{})
	case !on && p.held:
		p.held = false
		close(p.resume)
	}
}

// setCut cuts (closing every forwarded connection) or restores the path to Postgres.
func (p *pgProxy) setCut(cut bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cut = cut
	if cut {
		for c := range p.conns {
			_ = c.Close()
		}
	}
}

// viaProxy returns dbURL with its host:port replaced by the proxy's.
func (p *pgProxy) viaProxy(t testing.TB, dbURL string) string {
	t.Helper()
	u, err := url.Parse(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	u.Host = p.ln.Addr().String()
	return u.String()
}

// hostPort returns the host:port of a postgres:// URL.
func hostPort(t testing.TB, dbURL string) string {
	t.Helper()
	u, err := url.Parse(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	if u.Port() == "" {
		return u.Hostname() + ":5432"
	}
	return u.Host
}

// errorCode decodes the code of an HTTP error body, "" when the body is not one.
func errorCode(raw []byte) string {
	var body struct {
		Error struct {
			Code    string `json:"code"`
			Message string `json:"message"`
		} `json:"error"`
	}
	if json.Unmarshal(raw, &body) != nil || body.Error.Message == "" {
		return ""
	}
	return body.Error.Code
}

// TestPostgresUnreachable: with the path to Postgres cut, every publish shape answers 503 with
// the JSON error body and stores nothing, /readyz is 503; restored, publishing works again,
// /readyz is 200, and a client connected throughout gets what was committed meanwhile (by SQL,
// directly) and what is published after the recovery, with no gap.
func TestPostgresUnreachable(t *testing.T) {
	t.Parallel()
	direct := storetest.URL(t)
	proxy := startPGProxy(t, hostPort(t, direct))
	ts := startServerOn(t, proxy.viaProxy(t, direct))
	const user = "px"
	c := ts.liveWS(t, user)
	first := ts.publish(t, user, "before.cut", nil)
	if m := c.expect(t, "notification"); m.ID != first.ID || m.Seq != 1 {
		t.Fatalf("before the cut: %+v", m)
	}

	proxy.setCut(true)
	post := func(body any) (int, string) {
		t.Helper()
		var raw json.RawMessage
		st := ts.do(t, "POST", "/v1/notifications", testAPIKey, body, &raw)
		return st, errorCode(raw)
	}
	for name, body := range map[string]any{
		"single": map[string]any{"user_id": user, "topic": "cut.single", "data": map[string]int{"n": 1}},
		"batch": map[string]any{"notifications": []map[string]any{
			{"user_id": user, "topic": "cut.batch"}, {"user_id": "px-other", "topic": "cut.batch"}}},
		"fan-out":         map[string]any{"user_ids": []string{user, "px-other", "px-third"}, "topic": "cut.fanout"},
		"single with key": map[string]any{"user_id": user, "topic": "cut.single", "idempotency_key": "k-cut"},
	} {
		if st, code := post(body); st != http.StatusServiceUnavailable || code != "unavailable" {
			t.Errorf("%s publish with Postgres cut: %d %q, want 503 unavailable", name, st, code)
		}
	}
	var raw json.RawMessage
	if st := ts.do(t, "GET", "/readyz", "", nil, &raw); st != http.StatusServiceUnavailable || errorCode(raw) == "" {
		t.Errorf("/readyz with Postgres cut: %d %s", st, raw)
	}
	if st := ts.do(t, "GET", "/healthz", "", nil, nil); st != http.StatusOK {
		t.Errorf("/healthz with Postgres cut: %d", st)
	}
	// The application's own SQL path still commits (it does not go through the proxy); the
	// server's listener is down and must catch up from the table once it is back.
	conn := pgConn(t, direct)
	if seq, err := sqlInsert(context.Background(), conn, user, "cut.sql"); err != nil || seq != 2 {
		t.Fatalf("direct insert during the cut: seq %d, %v", seq, err)
	}
	time.Sleep(500 * time.Millisecond)
	proxy.setCut(false)

	deadline := time.Now().Add(20 * time.Second)
	for {
		if st := ts.do(t, "GET", "/readyz", "", nil, nil); st == http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("/readyz not 200 within 20s of restoring Postgres")
		}
		time.Sleep(100 * time.Millisecond)
	}
	if n := countRows(t, conn, "topic LIKE 'cut.%' AND topic <> 'cut.sql'"); n != 0 {
		t.Fatalf("%d rows stored by publishes answered 503", n)
	}
	after := ts.publish(t, user, "after.restore", nil)
	if after.Seq != 3 {
		t.Fatalf("publish after the restore got seq %d, want 3 (1 before, 2 by SQL during the cut)", after.Seq)
	}
	var fan struct{ Notifications []publishedNote }
	if st := ts.do(t, "POST", "/v1/notifications", testAPIKey,
		map[string]any{"user_ids": []string{user, "px-other"}, "topic": "after.fanout"}, &fan); st != http.StatusCreated || len(fan.Notifications) != 2 {
		t.Fatalf("fan-out after the restore: %d %+v", st, fan)
	}
	for _, want := range []struct {
		seq   int64
		topic string
	}{{2, "cut.sql"}, {3, "after.restore"}, {4, "after.fanout"}} {
		m := c.nextPastCount(t, 20*time.Second, want.seq-1)
		if m.Type != "notification" || m.Seq != want.seq || m.Topic != want.topic {
			t.Fatalf("client connected throughout got %+v, want seq %d %s", m, want.seq, want.topic)
		}
	}
}

// TestCatchUpBeforeNewerSignals: while the dispatcher waits on a slow fetch, the listener loses
// its connection (rows committed meanwhile send no NOTIFY), reconnects (asking for a catch-up)
// and receives a newer NOTIFY. The catch-up must run before that newer signal is delivered:
// delivered first, it moves the session's cursor past the rows the catch-up must bring, and
// they are never sent. Several rounds, since the dispatcher's choice between the two was random.
func TestCatchUpBeforeNewerSignals(t *testing.T) {
	t.Parallel()
	direct := storetest.URL(t)
	proxy := startPGProxy(t, hostPort(t, direct))
	ts := startServerOn(t, proxy.viaProxy(t, direct))
	const user = "order"
	c := ts.liveWS(t, user)
	admin := pgConn(t, storetest.BaseURL())
	conn := pgConn(t, direct)
	schema := schemaOf(t, direct)
	ctx := context.Background()
	insert := func() int64 {
		t.Helper()
		seq, err := sqlInsert(ctx, conn, user, "ordered")
		if err != nil {
			t.Fatal(err)
		}
		return seq
	}

	pid := listenerPID(t, admin, schema, 0)
	var want int64
	for round := range 4 {
		proxy.hold(true)
		insert() // its fetch hangs in the proxy
		time.Sleep(200 * time.Millisecond)
		if _, err := admin.Exec(ctx, "SELECT pg_terminate_backend($1)", pid); err != nil {
			t.Fatal(err)
		}
		insert() // no NOTIFY: the listener is down
		insert()
		pid = listenerPID(t, admin, schema, pid)
		insert() // a NOTIFY newer than what the catch-up must bring
		time.Sleep(200 * time.Millisecond)
		proxy.hold(false)
		for range 4 {
			m := c.nextPastCount(t, 10*time.Second, want)
			want++
			if m.Type != "notification" || m.Seq != want {
				t.Fatalf("round %d: got %+v, want seq %d", round, m, want)
			}
		}
	}
}

package main

// Nodes of a cluster on one schema: identity in /v1/stats and /metrics, leases, session
// history per node, a kill -9 closed as node_lost by a survivor, a restart that touches only
// its own rows, and the drain grace after SIGTERM.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/jackc/pgx/v5"

	"github.com/notifyd/notifyd/store"
	"github.com/notifyd/notifyd/store/storetest"
)

// historyOf counts the session_history rows of node by end reason ("open" for those not ended).
func historyOf(t testing.TB, conn *pgx.Conn, node string) map[string]int {
	t.Helper()
	rows, err := conn.Query(context.Background(), `SELECT coalesce(end_reason, 'open'), count(*)::int
		FROM session_history WHERE node_id = $1 GROUP BY 1`, node)
	if err != nil {
		t.Fatalf("session history of %s: %v", node, err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (kv [2]any, err error) {
		var k string
		var v int
		err = r.Scan(&k, &v)
		return [2]any{k, v}, err
	})
	if err != nil {
		t.Fatalf("session history of %s: %v", node, err)
	}
	m := map[string]int{}
	for _, kv := range out {
		m[kv[0].(string)] = kv[1].(int)
	}
	return m
}

// leases returns the nodes holding a running lease, with their draining flag.
func leases(t testing.TB, conn *pgx.Conn) map[string]bool {
	t.Helper()
	rows, err := conn.Query(context.Background(), `SELECT node_id, draining FROM nodes WHERE lease_until > now()`)
	if err != nil {
		t.Fatalf("nodes: %v", err)
	}
	out := map[string]bool{}
	var id string
	var draining bool
	if _, err := pgx.ForEachRow(rows, []any{&id, &draining}, func() error { out[id] = draining; return nil }); err != nil {
		t.Fatalf("nodes: %v", err)
	}
	return out
}

// getBody fetches url and returns its status and body.
func getBody(t testing.TB, url, bearer string) (int, string) {
	t.Helper()
	req, err := http.NewRequest("GET", url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if bearer != "" {
		req.Header.Set("Authorization", "Bearer "+bearer)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// nodeStats is the node part of /v1/stats.
type nodeStats struct {
	Node     string `json:"node"`
	Draining bool   `json:"draining"`
	Sessions int    `json:"sessions"`
}

// Two nodes on one schema: each has its lease row, names itself in /v1/stats and /metrics,
// and writes its id into the history of its sessions; a node closing cleanly removes its row
// and ends only its own rows.
func TestNodesIdentityAndLeases(t *testing.T) {
	dbURL := storetest.URL(t)
	a := startServerOn(t, dbURL, func(c *Config) { c.NodeID = "node-a" })
	b := startServerOn(t, dbURL, func(c *Config) { c.NodeID = "node-b" })
	conn := pgConn(t, dbURL)

	if got := leases(t, conn); len(got) != 2 || got["node-a"] || got["node-b"] {
		t.Fatalf("leases = %v, want node-a and node-b, neither draining", got)
	}
	for _, ts := range []*testServer{a, b} {
		var st nodeStats
		if code := ts.do(t, "GET", "/v1/stats", testAPIKey, nil, &st); code != http.StatusOK || st.Node != ts.NodeID() || st.Draining {
			t.Errorf("%s: /v1/stats = %d %+v", ts.NodeID(), code, st)
		}
		code, body := getBody(t, ts.URL+"/metrics", testAPIKey)
		if want := fmt.Sprintf("notifyd_node_info{node=%q} 1", ts.NodeID()); code != http.StatusOK || !strings.Contains(body, want) {
			t.Errorf("%s: /metrics (%d) lacks %s", ts.NodeID(), code, want)
		}
		if !strings.Contains(body, "notifyd_draining 0") {
			t.Errorf("%s: /metrics lacks notifyd_draining 0", ts.NodeID())
		}
	}

	ca, cb := a.liveWS(t, "nina"), b.liveWS(t, "nina")
	eventually(t, 10*time.Second, "both sessions' history rows with their node", func() bool {
		return historyOf(t, conn, "node-a")["open"] == 1 && historyOf(t, conn, "node-b")["open"] == 1
	})

	a.stop(t)
	if err := ca.waitClosed(t, 10*time.Second); err == nil {
		t.Fatal("node-a's client: no close")
	}
	if got := leases(t, conn); len(got) != 1 || got["node-b"] {
		t.Fatalf("leases after node-a closed = %v, want node-b", got)
	}
	if h := historyOf(t, conn, "node-a"); h["shutdown"] != 1 || h["open"] != 0 {
		t.Errorf("node-a's history after its close = %v, want 1 shutdown", h)
	}
	if h := historyOf(t, conn, "node-b"); h["open"] != 1 {
		t.Errorf("node-b's history after node-a closed = %v, want its session open", h)
	}
	cb.send(t, map[string]string{"type": "ping"})
	cb.expect(t, "pong")
}

// Without NOTIFY_NODE_ID a node makes a valid id of its own, different in every process.
func TestNodeDefaultID(t *testing.T) {
	dbURL := storetest.URL(t)
	a, b := startServerOn(t, dbURL), startServerOn(t, dbURL)
	if !store.ValidNodeID(a.NodeID()) || a.NodeID() == b.NodeID() {
		t.Fatalf("node ids %q and %q: want two different valid ids", a.NodeID(), b.NodeID())
	}
	var st nodeStats
	if a.do(t, "GET", "/v1/stats", testAPIKey, nil, &st); st.Node != a.NodeID() {
		t.Fatalf("/v1/stats node = %q, want %q", st.Node, a.NodeID())
	}
	if got := leases(t, pgConn(t, dbURL)); len(got) != 2 {
		t.Fatalf("leases = %v, want both nodes", got)
	}
}

// Drain: /readyz answers 503 and the node's row says draining, while publishing, connecting
// and live delivery go on.
func TestDrainKeepsServing(t *testing.T) {
	ts := startServer(t, func(c *Config) { c.NodeID = "drainer" })
	c := ts.liveWS(t, "dora")
	if code, _ := getBody(t, ts.URL+"/readyz", ""); code != http.StatusOK {
		t.Fatalf("/readyz before the drain: %d", code)
	}
	ts.Drain(time.Minute)
	if code, body := getBody(t, ts.URL+"/readyz", ""); code != http.StatusServiceUnavailable || !strings.Contains(body, "shutting_down") {
		t.Fatalf("/readyz while draining: %d %s, want 503 shutting_down", code, body)
	}
	if code, _ := getBody(t, ts.URL+"/healthz", ""); code != http.StatusOK {
		t.Fatalf("/healthz while draining: %d", code)
	}
	if got := leases(t, pgConn(t, ts.DBURL)); !got["drainer"] {
		t.Fatalf("leases while draining = %v, want drainer draining", got)
	}
	var st nodeStats
	if ts.do(t, "GET", "/v1/stats", testAPIKey, nil, &st); !st.Draining {
		t.Fatalf("/v1/stats while draining = %+v", st)
	}
	p := ts.publish(t, "dora", "during.drain", nil)
	if n := c.expect(t, "notification"); n.ID != p.ID {
		t.Fatalf("got %+v, want %s", n, p.ID)
	}
	late := ts.dialWS(t, "dora", url.Values{"cursor": {fmt.Sprint(p.Seq)}}) // a new connect is served too
	late.expect(t, "hello")
	late.expect(t, "synced")
}

// TestNodeProcesses runs two server processes on one schema (one build for all).
func TestNodeProcesses(t *testing.T) {
	bin := buildNotifyd(t)
	t.Run("kill -9: a survivor closes the history as node_lost", func(t *testing.T) { testKill9NodeLost(t, bin) })
	t.Run("restart closes only its own rows", func(t *testing.T) { testRestartOwnRows(t, bin) })
	t.Run("SIGTERM: readyz 503 while the grace serves", func(t *testing.T) { testDrainGrace(t, bin) })
}

// clusterEnv are the settings of the process tests: short heartbeats and leases.
func clusterEnv(node, lease string) []string {
	return []string{"NOTIFY_NODE_ID=" + node, "NOTIFY_NODE_LEASE=" + lease,
		"NOTIFY_PING_INTERVAL=1s", "NOTIFY_PING_TIMEOUT=2s"}
}

const clusterPingTimeout = 2 * time.Second

// testKill9NodeLost: after kill -9 of one node, the other closes the killed node's open session
// history as node_lost within ping_timeout + 5 s and removes its lease; its own stays.
func testKill9NodeLost(t *testing.T, bin string) {
	dbURL := storetest.URL(t)
	a := startProc(t, bin, dbURL, clusterEnv("proc-a", "2s")...)
	b := startProc(t, bin, dbURL, clusterEnv("proc-b", "2s")...)
	conn := pgConn(t, dbURL)
	a.liveWS(t, "kai")
	a.liveWS(t, "lea")
	cb := b.liveWS(t, "kai")
	eventually(t, 10*time.Second, "the sessions' history rows", func() bool {
		return historyOf(t, conn, "proc-a")["open"] == 2 && historyOf(t, conn, "proc-b")["open"] == 1
	})

	if err := a.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	a.waitExit(t, 10*time.Second)
	killed := time.Now()
	eventually(t, clusterPingTimeout+5*time.Second, "proc-a's history closed as node_lost", func() bool {
		h := historyOf(t, conn, "proc-a")
		return h[store.EndNodeLost] == 2 && h["open"] == 0
	})
	t.Logf("proc-a's sessions closed as node_lost %s after kill -9", time.Since(killed).Round(10*time.Millisecond))
	if got := leases(t, conn); len(got) != 1 || got["proc-b"] {
		t.Errorf("leases = %v, want proc-b only", got)
	}
	var rows int
	if err := conn.QueryRow(context.Background(), `SELECT count(*) FROM nodes WHERE node_id = 'proc-a'`).Scan(&rows); err != nil || rows != 0 {
		t.Errorf("proc-a's row still in nodes (%d, %v)", rows, err)
	}
	if h := historyOf(t, conn, "proc-b"); h["open"] != 1 || len(h) != 1 {
		t.Errorf("proc-b's history = %v, want its session open", h)
	}
	cb.send(t, map[string]string{"type": "ping"})
	cb.expect(t, "pong")
}

// testRestartOwnRows: a node killed and restarted under its id (within its lease) closes its
// own leftover history as restart and leaves the other node's open rows alone.
func testRestartOwnRows(t *testing.T, bin string) {
	dbURL := storetest.URL(t)
	a := startProc(t, bin, dbURL, clusterEnv("proc-a", "30s")...)
	b := startProc(t, bin, dbURL, clusterEnv("proc-b", "30s")...)
	conn := pgConn(t, dbURL)
	a.liveWS(t, "kai")
	cb := b.liveWS(t, "kai")
	eventually(t, 10*time.Second, "the sessions' history rows", func() bool {
		return historyOf(t, conn, "proc-a")["open"] == 1 && historyOf(t, conn, "proc-b")["open"] == 1
	})
	if err := a.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	a.waitExit(t, 10*time.Second)

	again := startProc(t, bin, dbURL, clusterEnv("proc-a", "30s")...)
	if h := historyOf(t, conn, "proc-a"); h["restart"] != 1 || h["open"] != 0 {
		t.Errorf("proc-a's history after its restart = %v, want its leftover closed as restart", h)
	}
	if h := historyOf(t, conn, "proc-b"); h["open"] != 1 || len(h) != 1 {
		t.Errorf("proc-b's history after proc-a's restart = %v, want its session open", h)
	}
	if got := leases(t, conn); len(got) != 2 {
		t.Errorf("leases = %v, want proc-a and proc-b", got)
	}
	cb.send(t, map[string]string{"type": "ping"})
	cb.expect(t, "pong")
	again.liveWS(t, "kai")
}

// testDrainGrace: after SIGTERM /readyz answers 503 while the node still serves for its grace
// (health, publishes, live delivery, new connects); a second SIGTERM ends the grace, and the
// sessions get bye shutdown, the process exits 0 and its lease row is gone.
func testDrainGrace(t *testing.T, bin string) {
	dbURL := storetest.URL(t)
	srv := startProc(t, bin, dbURL, "NOTIFY_NODE_ID=grace", "NOTIFY_DRAIN_GRACE=10m")
	conn := pgConn(t, dbURL)
	c := srv.liveWS(t, "gus")
	if code, _ := getBody(t, srv.URL+"/readyz", ""); code != http.StatusOK {
		t.Fatalf("/readyz before SIGTERM: %d", code)
	}
	if err := srv.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "/readyz answering 503", func() bool {
		code, _ := getBody(t, srv.URL+"/readyz", "")
		return code == http.StatusServiceUnavailable
	})
	if code, _ := getBody(t, srv.URL+"/healthz", ""); code != http.StatusOK {
		t.Errorf("/healthz during the grace: %d", code)
	}
	p := srv.publish(t, "gus", "during.grace", nil)
	if n := c.expect(t, "notification"); n.ID != p.ID {
		t.Fatalf("during the grace got %+v, want notification %s", n, p.ID)
	}
	late := srv.dialWS(t, "gus", url.Values{"cursor": {fmt.Sprint(p.Seq)}})
	late.expect(t, "hello")
	late.expect(t, "synced")
	eventually(t, 5*time.Second, "the lease marked draining", func() bool { return leases(t, conn)["grace"] })
	if code, body := getBody(t, srv.URL+"/metrics", testAPIKey); code != http.StatusOK || !strings.Contains(body, "notifyd_draining 1") {
		t.Errorf("/metrics during the grace (%d) lacks notifyd_draining 1", code)
	}

	if err := srv.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	for i, cl := range []*wsClient{c, late} {
		if bye := cl.next(t, 10*time.Second); bye.Type != "bye" || bye.Reason != "shutdown" {
			t.Fatalf("client %d after the grace: %+v, want bye shutdown", i, bye)
		}
		var ce *websocket.CloseError
		if err := cl.waitClosed(t, 10*time.Second); !errors.As(err, &ce) || ce.Code != websocket.CloseServiceRestart {
			t.Fatalf("client %d: closed with %v, want 1012", i, err)
		}
	}
	if code := srv.waitExit(t, 15*time.Second); code != 0 {
		t.Fatalf("exit code %d, want 0\n%s", code, srv.out.String())
	}
	if got := leases(t, conn); len(got) != 0 {
		t.Errorf("leases after the exit = %v, want none", got)
	}
	if h := historyOf(t, conn, "grace"); h["shutdown"] != 2 || len(h) != 1 {
		t.Errorf("history = %v, want 2 sessions ended by shutdown", h)
	}
}

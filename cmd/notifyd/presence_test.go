package main

// Cluster-wide presence: several nodes on one schema list each other's sessions in
// /v1/users/{u}/sessions and /v1/stats (with its per-node breakdown), the per-user session cap
// counts every node's sessions, and a killed node's sessions leave presence in time.

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/notifyd/notifyd/store/storetest"
)

// clusterNode is the per-node part of /v1/stats.
type clusterNode struct {
	Node        string           `json:"node"`
	Sessions    int64            `json:"sessions"`
	Users       int64            `json:"users"`
	ByTransport map[string]int64 `json:"by_transport"`
	Draining    bool             `json:"draining"`
}

// clusterStats is /v1/stats as a node of a cluster answers it.
type clusterStats struct {
	Node           string           `json:"node"`
	Sessions       int64            `json:"sessions"`
	Users          int64            `json:"users"`
	ByTransport    map[string]int64 `json:"by_transport"`
	Nodes          []clusterNode    `json:"nodes"`
	RecentSessions []listedSession  `json:"recent_sessions"`
}

// listedSession is an item of /v1/users/{u}/sessions.
type listedSession struct {
	ID         string  `json:"id"`
	User       string  `json:"user"`
	Transport  string  `json:"transport"`
	Node       string  `json:"node"`
	LastSeenAt *string `json:"last_seen_at"`
}

// clusterSessionsOf lists user's sessions as ts answers, "id@node/transport" sorted.
func (ts *testServer) clusterSessionsOf(t testing.TB, user string) []string {
	t.Helper()
	var out struct {
		Sessions []listedSession `json:"sessions"`
	}
	if code := ts.do(t, "GET", "/v1/users/"+user+"/sessions", testAPIKey, nil, &out); code != http.StatusOK {
		t.Fatalf("sessions of %s: status %d", user, code)
	}
	var list []string
	for _, s := range out.Sessions {
		list = append(list, s.ID+"@"+s.Node+"/"+s.Transport)
	}
	slices.Sort(list)
	return list
}

func (ts *testServer) clusterStats(t testing.TB, query string) clusterStats {
	t.Helper()
	var st clusterStats
	if code := ts.do(t, "GET", "/v1/stats"+query, testAPIKey, nil, &st); code != http.StatusOK {
		t.Fatalf("stats: status %d", code)
	}
	return st
}

// describeNodes renders a per-node breakdown for comparison and messages.
func describeNodes(ns []clusterNode) string {
	var b strings.Builder
	for _, n := range ns {
		fmt.Fprintf(&b, "%s:%d/%d ws%d sse%d lp%d draining=%t; ", n.Node, n.Sessions, n.Users,
			n.ByTransport["websocket"], n.ByTransport["sse"], n.ByTransport["longpoll"], n.Draining)
	}
	return b.String()
}

// Three nodes with sessions on each: every node lists a user's sessions on all of them, and
// /v1/stats on every node gives the cluster's totals and the same per-node breakdown (the node
// asked first), and recent_sessions across nodes.
func TestClusterPresence(t *testing.T) {
	dbURL := storetest.URL(t)
	var nodes []*testServer
	for _, id := range []string{"pa", "pb", "pc"} {
		nodes = append(nodes, startServerOn(t, dbURL, func(c *Config) { c.NodeID = id; c.NodeLease = 2 * time.Second }))
	}
	a, b, c := nodes[0], nodes[1], nodes[2]

	want := map[string]bool{}
	for _, d := range []struct {
		node      *testServer
		tr, user  string
		listed    bool
		nodeLabel string
	}{
		{a, "websocket", "pia", true, "pa"},
		{b, "sse", "pia", true, "pb"},
		{c, "longpoll", "pia", true, "pc"},
		{b, "websocket", "quin", false, "pb"},
	} {
		cl := d.node.dialTransport(t, d.tr, d.user, nil)
		h := hello(t, cl, d.tr, d.user)
		if d.listed {
			want[h.Session+"@"+d.nodeLabel+"/"+d.tr] = true
		}
	}
	wantList := make([]string, 0, len(want))
	for k := range want {
		wantList = append(wantList, k)
	}
	slices.Sort(wantList)

	// The breakdown every node must give, this node's own entry first.
	breakdown := map[string]string{
		"pa": "pa:1/1 ws1 sse0 lp0 draining=false; ",
		"pb": "pb:2/2 ws1 sse1 lp0 draining=false; ",
		"pc": "pc:1/1 ws0 sse0 lp1 draining=false; ",
	}
	for _, ts := range nodes {
		eventually(t, 10*time.Second, ts.NodeID()+" listing pia's sessions on every node", func() bool {
			return slices.Equal(ts.clusterSessionsOf(t, "pia"), wantList)
		})
		wantNodes := breakdown[ts.NodeID()]
		for _, id := range []string{"pa", "pb", "pc"} {
			if id != ts.NodeID() {
				wantNodes += breakdown[id]
			}
		}
		var st clusterStats
		eventually(t, 10*time.Second, ts.NodeID()+"'s /v1/stats over the cluster", func() bool {
			st = ts.clusterStats(t, "?recent=1")
			return st.Sessions == 4 && st.Users == 2 && describeNodes(st.Nodes) == wantNodes &&
				st.ByTransport["websocket"] == 2 && st.ByTransport["sse"] == 1 && st.ByTransport["longpoll"] == 1 &&
				len(st.RecentSessions) == 4
		})
		if st.Node != ts.NodeID() {
			t.Errorf("%s: stats node = %q", ts.NodeID(), st.Node)
		}
		for _, s := range st.RecentSessions {
			if s.Node == "" || (s.Node == ts.NodeID()) != (s.LastSeenAt != nil) {
				t.Errorf("%s: recent session %+v: want its node, and last_seen_at exactly for this node's", ts.NodeID(), s)
			}
		}
	}
}

// The per-user cap counts every node: with a cap of 2, one session on node A and one on node B,
// a third connect on either node is refused 429 too_many_sessions over every transport; another
// user still connects, and once B's session ends A takes a new one.
func TestClusterSessionCap(t *testing.T) {
	dbURL := storetest.URL(t)
	cfg := func(id string) func(*Config) {
		return func(c *Config) { c.NodeID = id; c.NodeLease = 2 * time.Second; c.MaxSessionsPerUser = 2 }
	}
	a, b := startServerOn(t, dbURL, cfg("cap-a")), startServerOn(t, dbURL, cfg("cap-b"))
	conn := pgConn(t, dbURL)
	hello(t, a.dialWS(t, "cara", nil), "websocket", "cara")
	cb := b.dialWS(t, "cara", nil)
	hello(t, cb, "websocket", "cara")
	eventually(t, 10*time.Second, "both sessions' history rows, and each node seeing the other", func() bool {
		return historyOf(t, conn, "cap-a")["open"] == 1 && historyOf(t, conn, "cap-b")["open"] == 1 &&
			len(a.clusterSessionsOf(t, "cara")) == 2 && len(b.clusterSessionsOf(t, "cara")) == 2
	})
	for _, ts := range []*testServer{a, b} {
		for _, tr := range allTransports {
			if st, code := ts.refusal(t, tr, url.Values{"token": {ts.token(t, "cara")}}, nil); st != 429 || code != "too_many_sessions" {
				t.Errorf("%s: third session over %s: %d %s, want 429 too_many_sessions", ts.NodeID(), tr, st, code)
			}
		}
	}
	hello(t, a.dialWS(t, "dora", nil), "websocket", "dora")

	_ = cb.conn.Close()
	eventually(t, 10*time.Second, "cap-b's session of cara closed in its history", func() bool {
		return historyOf(t, conn, "cap-b")["open"] == 0
	})
	hello(t, a.dialWS(t, "cara", nil), "websocket", "cara")
}

// A node killed with kill -9 leaves cluster-wide presence within ping_timeout + 5 s: the
// survivor's lists and stats drop its sessions once its lease lapses.
func TestClusterPresenceKilledNode(t *testing.T) {
	bin := buildNotifyd(t)
	dbURL := storetest.URL(t)
	a := startProc(t, bin, dbURL, clusterEnv("kill-a", "2s")...)
	b := startProc(t, bin, dbURL, clusterEnv("kill-b", "2s")...)
	a.liveWS(t, "kim")
	a.liveWS(t, "lou")
	cb := b.liveWS(t, "kim")
	eventually(t, 10*time.Second, "kill-b seeing kill-a's sessions", func() bool {
		st := b.clusterStats(t, "")
		return len(b.clusterSessionsOf(t, "kim")) == 2 && st.Sessions == 3 && st.Users == 2 && len(st.Nodes) == 2
	})

	if err := a.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	a.waitExit(t, 10*time.Second)
	killed := time.Now()
	eventually(t, clusterPingTimeout+5*time.Second, "kill-a's sessions gone from kill-b's presence", func() bool {
		st := b.clusterStats(t, "")
		return len(b.clusterSessionsOf(t, "kim")) == 1 && len(b.clusterSessionsOf(t, "lou")) == 0 &&
			st.Sessions == 1 && st.Users == 1 && describeNodes(st.Nodes) == "kill-b:1/1 ws1 sse0 lp0 draining=false; "
	})
	t.Logf("kill-a's sessions left presence %s after kill -9", time.Since(killed).Round(10*time.Millisecond))
	cb.send(t, map[string]string{"type": "ping"})
	cb.expect(t, "pong")
}

// The dashboard of one node of two shows both nodes in its Nodes table, the cluster's totals,
// and the other node's session among the recent ones, with its node; no console errors.
func TestBrowserClusterDashboard(t *testing.T) {
	requireE2E(t)
	dbURL := storetest.URL(t)
	a := startServerOn(t, dbURL, func(c *Config) { c.NodeID = "dash-a"; c.NodeLease = 2 * time.Second })
	b := startServerOn(t, dbURL, func(c *Config) { c.NodeID = "dash-b"; c.NodeLease = 2 * time.Second })
	a.liveWS(t, "ada")
	hello(t, b.dialTransport(t, "sse", "bea", nil), "sse", "bea")
	hello(t, b.dialTransport(t, "websocket", "bea", nil), "websocket", "bea")

	br := startBrowser(t)
	br.launch("a", "")
	br.open("a", "dash", a.URL+"/dashboard.html")
	br.must(map[string]any{"cmd": "fill", "page": "dash", "selector": "#key", "value": testAPIKey})
	br.must(map[string]any{"cmd": "click", "page": "dash", "selector": "#key-form button"})
	waitFor(t, 15*time.Second, "the dashboard's Nodes table and totals over both nodes", func() (bool, string) {
		var d struct {
			Hidden   bool
			Nodes    []string
			Sessions string
			Users    string
			Recent   []string
		}
		br.eval("dash", `({ Hidden: document.getElementById('nodes-card').hidden,
			Nodes: [...document.querySelectorAll('#nodes tr')].map(r => [...r.children].map(c => c.textContent).join('|')),
			Sessions: document.getElementById('sessions').textContent,
			Users: document.getElementById('users').textContent,
			Recent: [...document.querySelectorAll('#recent tr')].map(r => [...r.children].slice(1, 5).map(c => c.textContent).join('|')) })`, &d)
		slices.Sort(d.Recent)
		ok := !d.Hidden && d.Sessions == "3" && d.Users == "2" &&
			slices.Equal(d.Nodes, []string{"dash-a|1|1|1|0|0|serving (this node)", "dash-b|2|1|1|1|0|serving"}) &&
			slices.Equal(d.Recent, []string{"ada|test|websocket|dash-a", "bea|test|sse|dash-b", "bea|test|websocket|dash-b"})
		raw, _ := json.Marshal(d)
		return ok, string(raw)
	})
	noConsoleErrors(t, br, "dash")
	br.screenshot("dash", "dashboard-cluster")
}

// With its path to Postgres cut, a node of a cluster still answers /v1/stats with what it knows
// (its own sessions, nodes with itself alone, cluster_unavailable), while a user's session
// list, which would be missing the other nodes' sessions, is 503 unavailable.
func TestClusterStatsWithoutPostgres(t *testing.T) {
	direct := storetest.URL(t)
	proxy := startPGProxy(t, hostPort(t, direct))
	a := startServerOn(t, proxy.viaProxy(t, direct), func(c *Config) { c.NodeID = "cut-a"; c.NodeLease = 30 * time.Second })
	b := startServerOn(t, direct, func(c *Config) { c.NodeID = "cut-b"; c.NodeLease = 30 * time.Second })
	a.liveWS(t, "cy")
	b.liveWS(t, "cy")
	eventually(t, 10*time.Second, "cut-a seeing cut-b's session", func() bool {
		st := a.clusterStats(t, "?recent=1")
		return st.Sessions == 2 && len(st.Nodes) == 2 && len(st.RecentSessions) == 2
	})

	proxy.setCut(true)
	var st struct {
		clusterStats
		Unavailable bool `json:"cluster_unavailable"`
	}
	eventually(t, 10*time.Second, "cut-a's stats of its own, marked cluster_unavailable", func() bool {
		st = struct {
			clusterStats
			Unavailable bool `json:"cluster_unavailable"`
		}{}
		// Once past the one-second reuse of the last answer, nodes lists cut-a alone.
		code := a.do(t, "GET", "/v1/stats?recent=1", testAPIKey, nil, &st)
		return code == http.StatusOK && st.Unavailable && len(st.Nodes) == 1
	})
	if st.Sessions != 1 || st.Users != 1 || describeNodes(st.Nodes) != "cut-a:1/1 ws1 sse0 lp0 draining=false; " ||
		len(st.RecentSessions) != 1 || st.RecentSessions[0].Node != "cut-a" {
		t.Errorf("cut-a's stats without Postgres = %+v", st)
	}
	var raw json.RawMessage
	if code := a.do(t, "GET", "/v1/users/cy/sessions", testAPIKey, nil, &raw); code != http.StatusServiceUnavailable || errorCode(raw) != "unavailable" {
		t.Errorf("cut-a's session list without Postgres: %d %s, want 503 unavailable", code, raw)
	}
	if got := b.clusterStats(t, ""); got.Sessions != 2 || len(got.Nodes) != 2 {
		t.Errorf("cut-b's stats = %+v, want both nodes (cut-a's lease runs)", got)
	}
}

package main

// The cluster harness: three notifyd processes on one schema behind a real haproxy (Debian's),
// round-robin without stickiness, and clients that reconnect through it the way a real client
// does (session= and cursor=), recording every message and the node that served it.

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"text/template"
	"time"

	"github.com/gorilla/websocket"

	"github.com/notifyd/notifyd/handlers"
	"github.com/notifyd/notifyd/store/storetest"
)

// requireHaproxy skips the test when haproxy is missing, unless NOTIFYD_E2E is set (as `make
// test` does after .ci/e2e-deps installed it): then a missing haproxy is a failure.
func requireHaproxy(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath(sbin("haproxy")); err == nil {
		return
	}
	if os.Getenv("NOTIFYD_E2E") != "" {
		t.Fatal("NOTIFYD_E2E is set but haproxy is missing (run .ci/e2e-deps)")
	}
	t.Skip("cluster test skipped: haproxy not installed (run .ci/e2e-deps, or make test, which does)")
}

// haproxyConfig is the configuration the cluster tests run haproxy with, and the one
// README.md shows ("Running several nodes"), with production timings there.
//
//   - Round-robin, no stickiness: every request, each long-poll included, may land on any node.
//   - option http-server-close: a new connection to the node per request, so a request is
//     never sent on a kept-alive connection the node is closing (a draining node, or a parked
//     long-poll, which closes its connection after the answer).
//   - WebSocket: haproxy passes the upgrade through and tunnels; timeout tunnel bounds an idle
//     tunnel (the server pings far more often). SSE streams unbuffered (haproxy does not buffer
//     responses); timeout server > the longest poll wait (60 s) and > the SSE keepalive.
//   - Health: GET /readyz, which answers 503 from the first moment of a drain; with
//     inter/fall a node is out of rotation within inter*fall, well inside the drain grace.
//   - retry-on conn-failure with option redispatch: a request that could not reach a node (it
//     died, or closed its listener) goes to another; nothing the node may have run is replayed.
//   - X-Served-By names the node in every answer (the tests read it; drop it in production).
const haproxyConfig = `global
    maxconn {{.MaxConn}}

defaults
    mode http
    option http-server-close
    option forwardfor
    option redispatch 1
    retries 3
    retry-on conn-failure
    timeout connect 2s
    timeout client 75s
    timeout server 75s
    timeout tunnel 1h
    timeout http-request 10s
    timeout client-fin 5s
    timeout server-fin 5s

frontend notifyd
    bind {{.Bind}}
    default_backend notifyd

backend notifyd
    balance roundrobin
    option httpchk
    http-check send meth GET uri /readyz
    http-check expect status 200
    default-server check inter {{.Inter}} fall 2 rise 1
    http-response set-header X-Served-By %[srv_name]
{{- range .Servers}}
    server {{.Name}} {{.Addr}}
{{- end}}
`

// haproxyServer is one backend line.
type haproxyServer struct{ Name, Addr string }

// clusterNodeEnv are the settings of every node of the harness: short heartbeats, leases and
// drain grace, the haproxy in front trusted for X-Forwarded-For, and connect rate limits off
// (every client comes from 127.0.0.1).
func clusterNodeEnv(node string) []string {
	return []string{"NOTIFY_NODE_ID=" + node, "NOTIFY_NODE_LEASE=2s",
		"NOTIFY_PING_INTERVAL=1s", "NOTIFY_PING_TIMEOUT=3s", "NOTIFY_DRAIN_GRACE=2s", "NOTIFY_SHUTDOWN_TIMEOUT=5s",
		"NOTIFY_TRUSTED_PROXIES=127.0.0.1/32", "NOTIFY_CONNECT_RATE_PER_USER=off", "NOTIFY_CONNECT_RATE_PER_IP=off"}
}

// cluster is n notifyd processes on one schema behind haproxy.
type cluster struct {
	t     *testing.T
	bin   string
	dbURL string
	nodes []*procServer // by index; a restarted node replaces its entry
	names []string
	addrs []string
	env   []string // more settings of every node
	proxy *proxyProc
	// lb is a testServer whose URL is haproxy's: its helpers (publish, dial...) go through it.
	lb *testServer
}

// startCluster starts n nodes of bin (the built server, buildNotifyd), env added to their
// settings, and haproxy in front of them.
func startCluster(t *testing.T, bin string, n int, env ...string) *cluster {
	t.Helper()
	requireHaproxy(t)
	c := &cluster{t: t, bin: bin, dbURL: storetest.URL(t), env: env}
	for i := range n {
		c.names = append(c.names, fmt.Sprintf("node-%d", i))
		c.addrs = append(c.addrs, freeAddr(t))
		c.nodes = append(c.nodes, nil)
	}
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { c.nodes[i] = c.startNode(i) })
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}

	dir := proxyDir(t, "haproxy")
	port := freePort(t)
	var servers []haproxyServer
	for i := range n {
		servers = append(servers, haproxyServer{Name: c.names[i], Addr: c.addrs[i]})
	}
	var cfg strings.Builder
	tmpl := template.Must(template.New("haproxy").Parse(haproxyConfig))
	if err := tmpl.Execute(&cfg, map[string]any{"Bind": fmt.Sprintf("127.0.0.1:%d", port), "Inter": "500ms", "MaxConn": 4096, "Servers": servers}); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "haproxy.cfg"), []byte(cfg.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	c.proxy = &proxyProc{t: t, name: "haproxy", dir: dir, port: port, args: []string{"-db", "-f", "haproxy.cfg"}, stopWait: 5 * time.Second}
	c.proxy.start()
	t.Cleanup(func() {
		c.proxy.stop()
		if t.Failed() {
			out, _ := os.ReadFile(filepath.Join(dir, "haproxy.out"))
			t.Logf("haproxy output:\n%s", out)
		}
	})
	c.lb = &testServer{URL: "http://" + c.proxy.addr(), DBURL: c.dbURL, auth: handlers.NewAuth(testSecret, testAPIKey, nil)}
	c.waitInRotation(n)
	return c
}

// startNode starts node i on its own address (the same on every restart, as haproxy knows it)
// and waits until it answers /healthz.
func (c *cluster) startNode(i int) *procServer {
	t := c.t
	t.Helper()
	env := append(clusterNodeEnv(c.names[i]), "NOTIFY_ADDR="+c.addrs[i])
	cmd := exec.Command(c.bin)
	cmd.Env = append(os.Environ(), "DATABASE_URL="+c.dbURL, "NOTIFY_JWT_SECRET="+testSecret,
		"NOTIFY_API_KEY="+testAPIKey, "NOTIFY_LOG_LEVEL=warn", "NOTIFY_DEV=false")
	cmd.Env = append(append(cmd.Env, env...), c.env...)
	out := &lockedBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Errorf("start %s: %v", c.names[i], err)
		return nil
	}
	p := &procServer{cmd: cmd, out: out, exited: make(chan struct{}),
		testServer: &testServer{URL: "http://" + c.addrs[i], DBURL: c.dbURL, auth: handlers.NewAuth(testSecret, testAPIKey, nil)}}
	go func() {
		p.err = cmd.Wait()
		close(p.exited)
	}()
	name := c.names[i]
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-p.exited
		if t.Failed() {
			t.Logf("%s output:\n%s", name, out.String())
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		if resp, err := http.Get(p.URL + "/readyz"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return p
			}
		}
		select {
		case <-p.exited:
			t.Errorf("%s exited at start: %v\n%s", name, p.err, out.String())
			return nil
		default:
		}
		if time.Now().After(deadline) {
			t.Errorf("%s did not answer /readyz within 30s\n%s", name, out.String())
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// servedBy fetches /readyz through haproxy and returns the node that answered.
func (c *cluster) servedBy() string {
	resp, err := http.Get(c.lb.URL + "/readyz")
	if err != nil {
		return ""
	}
	resp.Body.Close()
	return resp.Header.Get("X-Served-By")
}

// waitInRotation waits until haproxy sends requests to want distinct nodes.
func (c *cluster) waitInRotation(want int) {
	c.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		seen := map[string]bool{}
		for range 3 * len(c.names) {
			if n := c.servedBy(); n != "" {
				seen[n] = true
			}
		}
		if len(seen) >= want {
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("haproxy sends requests to %v, want %d nodes", seen, want)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// ---- clients that reconnect through the load balancer --------------------------------------

// clusterClient is one device of user on transport tr, connected through haproxy. It
// reconnects, with session= and cursor=, whenever its connection ends (bye shutdown, a killed
// node, a failed poll), until it is kicked or stopped. It records every message.
type clusterClient struct {
	c    *cluster
	tr   string
	user string
	tok  string

	mu       sync.Mutex
	session  string
	cursor   int64
	hellos   int
	notes    []msg    // every notification, in arrival order
	nodes    []string // the node of each connection (each poll for long-poll)
	byes     []string
	conns    int // connections made (polls for long-poll)
	failures int // connects or polls that failed
	kicked   bool

	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
	// wait is the long-poll wait, in seconds.
	wait int
}

// connect starts a client and waits until its first connection said hello.
func (c *cluster) connect(tr, user string) *clusterClient {
	c.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cl := &clusterClient{c: c, tr: tr, user: user, tok: c.lb.token(c.t, user), ctx: ctx, cancel: cancel, done: make(chan struct{}), wait: 2}
	go cl.run()
	c.t.Cleanup(cl.stop)
	eventually(c.t, 10*time.Second, tr+" client's hello", func() bool {
		cl.mu.Lock()
		defer cl.mu.Unlock()
		return cl.hellos > 0
	})
	return cl
}

// stop ends the client and waits for its loop.
func (cl *clusterClient) stop() {
	cl.cancel()
	<-cl.done
}

func (cl *clusterClient) run() {
	defer close(cl.done)
	for cl.ctx.Err() == nil {
		var err error
		switch cl.tr {
		case "websocket":
			err = cl.runWS()
		case "sse":
			err = cl.runSSE()
		case "longpoll":
			err = cl.runPoll()
		}
		if cl.isKicked() {
			return
		}
		if err != nil {
			cl.mu.Lock()
			cl.failures++
			cl.mu.Unlock()
		}
		select {
		case <-cl.ctx.Done():
			return
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (cl *clusterClient) isKicked() bool {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	return cl.kicked
}

// query is the connect query: token (WebSocket and SSE), the session to resume and the cursor.
func (cl *clusterClient) query(token bool) url.Values {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	q := url.Values{"cursor": {strconv.FormatInt(cl.cursor, 10)}}
	if token {
		q.Set("token", cl.tok)
	}
	if cl.session != "" {
		q.Set("session", cl.session)
	}
	return q
}

// take records one server message; it reports whether the connection should end (bye).
func (cl *clusterClient) take(m msg) (end bool) {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	switch m.Type {
	case "hello":
		cl.hellos++
		cl.session = m.Session
	case "notification":
		cl.notes = append(cl.notes, m)
		cl.cursor = max(cl.cursor, m.Seq)
	case "bye":
		cl.byes = append(cl.byes, m.Reason)
		cl.kicked = m.Reason == "kicked"
		return true
	}
	return false
}

func (cl *clusterClient) served(node string) {
	cl.mu.Lock()
	cl.nodes = append(cl.nodes, node)
	cl.conns++
	cl.mu.Unlock()
}

func (cl *clusterClient) runWS() error {
	u := "ws" + strings.TrimPrefix(cl.c.lb.URL, "http") + "/v1/ws?" + cl.query(true).Encode()
	d := websocket.Dialer{HandshakeTimeout: 5 * time.Second}
	conn, resp, err := d.DialContext(cl.ctx, u, nil)
	if err != nil {
		return err
	}
	defer conn.Close()
	cl.served(resp.Header.Get("X-Served-By"))
	stop := context.AfterFunc(cl.ctx, func() { _ = conn.Close() })
	defer stop()
	for {
		_, data, err := conn.ReadMessage()
		if err != nil {
			return err
		}
		var m msg
		if err := json.Unmarshal(data, &m); err != nil {
			return err
		}
		if cl.take(m) {
			return nil
		}
	}
}

func (cl *clusterClient) runSSE() error {
	req, err := http.NewRequestWithContext(cl.ctx, "GET", cl.c.lb.URL+"/v1/sse?"+cl.query(true).Encode(), nil)
	if err != nil {
		return err
	}
	req.Header.Set("Accept", "text/event-stream")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("sse: status %d", resp.StatusCode)
	}
	cl.served(resp.Header.Get("X-Served-By"))
	br := bufio.NewReader(resp.Body)
	var data []string
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			return err
		}
		line = strings.TrimSuffix(line, "\n")
		switch {
		case line == "":
			if len(data) > 0 {
				var m msg
				if err := json.Unmarshal([]byte(strings.Join(data, "\n")), &m); err != nil {
					return err
				}
				if cl.take(m) {
					return nil
				}
			}
			data = nil
		case strings.HasPrefix(line, "data:"):
			data = append(data, strings.TrimPrefix(strings.TrimPrefix(line, "data:"), " "))
		}
	}
}

// runPoll polls until a bye or a failed poll; the next run continues with the same session
// and cursor, wherever haproxy sends it.
func (cl *clusterClient) runPoll() error {
	for cl.ctx.Err() == nil {
		q := cl.query(false)
		q.Set("wait", strconv.Itoa(cl.wait))
		ctx, cancel := context.WithTimeout(cl.ctx, time.Duration(cl.wait+15)*time.Second)
		req, err := http.NewRequestWithContext(ctx, "GET", cl.c.lb.URL+"/v1/poll?"+q.Encode(), nil)
		if err != nil {
			cancel()
			return err
		}
		req.Header.Set("Authorization", "Bearer "+cl.tok)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			cancel()
			return err
		}
		var reply pollReply
		err = json.NewDecoder(resp.Body).Decode(&reply)
		resp.Body.Close()
		cancel()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("poll: status %d", resp.StatusCode)
		}
		if err != nil {
			return err
		}
		cl.served(resp.Header.Get("X-Served-By"))
		bye := false
		for _, m := range reply.Messages {
			bye = cl.take(m) || bye
		}
		cl.mu.Lock()
		cl.session = reply.Session // the session to poll with from now on (it may have moved)
		cl.cursor = max(cl.cursor, reply.Cursor)
		cl.mu.Unlock()
		if bye {
			return nil
		}
	}
	return nil
}

// snapshot returns what the client holds so far.
func (cl *clusterClient) snapshot() (notes []msg, hellos int, nodes []string) {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	return append([]msg(nil), cl.notes...), cl.hellos, append([]string(nil), cl.nodes...)
}

// holds reports whether the client has received every id of want.
func (cl *clusterClient) holds(want map[string]bool) bool {
	notes, _, _ := cl.snapshot()
	got := map[string]bool{}
	for _, m := range notes {
		got[m.ID] = true
	}
	for id := range want {
		if !got[id] {
			return false
		}
	}
	return true
}

// check verifies the client's notifications against want (id -> seq, every notification of
// the user): each exactly once after dedupe by id, and in seq order as they arrived (a
// notification seen again after a reconnect is counted in dups; exact demands none).
func (cl *clusterClient) check(t *testing.T, want map[string]int64, exact bool) (dups int) {
	t.Helper()
	notes, _, _ := cl.snapshot()
	seen := map[string]bool{}
	var last int64
	for _, m := range notes {
		if seen[m.ID] {
			dups++
			continue
		}
		seen[m.ID] = true
		seq, ok := want[m.ID]
		switch {
		case !ok:
			t.Errorf("%s client of %s: unexpected notification %s (seq %d)", cl.tr, cl.user, m.ID, m.Seq)
		case seq != m.Seq:
			t.Errorf("%s client of %s: %s came with seq %d, published as %d", cl.tr, cl.user, m.ID, m.Seq, seq)
		case m.Seq != last+1:
			t.Errorf("%s client of %s: seq %d after %d (a gap, or out of order)", cl.tr, cl.user, m.Seq, last)
		}
		last = max(last, m.Seq)
	}
	if len(seen) != len(want) {
		t.Errorf("%s client of %s: %d distinct notifications, want %d", cl.tr, cl.user, len(seen), len(want))
	}
	if exact && dups > 0 {
		t.Errorf("%s client of %s: %d notifications twice", cl.tr, cl.user, dups)
	}
	return dups
}

package main

// Browser end-to-end tests of reach (see browser_test.go): a client that
// starts below what its path allows moves up within seconds, and the tabs of
// one browser share one connection. Each counts what the server was asked
// for through a counting reverse proxy in front of it, so that a test cannot
// pass on the wrong path.

import (
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// transportCounts are the realtime requests a countingProxy passed on.
type transportCounts struct {
	WSUpgrades  int // /v1/ws answered 101
	SSEStreams  int // /v1/sse answered 200
	Polls       int // /v1/poll requests
	NewSessions int // /v1/poll requests without session=: each opens a session
	PollsNow    int // /v1/poll requests waiting now
	Sessions    int // distinct session= values of /v1/poll
}

// countingProxy is a reverse proxy in front of a notifyd that counts the
// WebSocket upgrades, SSE streams and polls it passes on. It keeps Host (the
// server compares Origin with it) and adds X-Forwarded-For, as nginx does.
type countingProxy struct {
	URL      string
	mu       sync.Mutex
	c        transportCounts
	sessions map[string]bool
}

func startCountingProxy(t *testing.T, backend string) *countingProxy {
	t.Helper()
	p := &countingProxy{sessions: map[string]bool{}}
	rp := httputil.NewSingleHostReverseProxy(&url.URL{Scheme: "http", Host: backend})
	rp.ErrorLog = log.New(io.Discard, "", 0) // a closed tab's aborted poll is no error here
	rp.ModifyResponse = func(resp *http.Response) error {
		p.mu.Lock()
		defer p.mu.Unlock()
		switch resp.Request.URL.Path {
		case "/v1/ws":
			if resp.StatusCode == http.StatusSwitchingProtocols {
				p.c.WSUpgrades++
			}
		case "/v1/sse":
			if resp.StatusCode == http.StatusOK {
				p.c.SSEStreams++
			}
		}
		return nil
	}
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v1/poll" {
			p.mu.Lock()
			p.c.Polls++
			p.c.PollsNow++
			if s := r.URL.Query().Get("session"); s == "" {
				p.c.NewSessions++
			} else {
				p.sessions[s] = true
			}
			p.mu.Unlock()
			defer func() {
				p.mu.Lock()
				p.c.PollsNow--
				p.mu.Unlock()
			}()
		}
		rp.ServeHTTP(w, r)
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h, ErrorLog: log.New(io.Discard, "", 0)}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })
	p.URL = "http://" + ln.Addr().String()
	return p
}

// counts are the counts so far.
func (p *countingProxy) counts() transportCounts {
	p.mu.Lock()
	defer p.mu.Unlock()
	c := p.c
	c.Sessions = len(p.sessions)
	return c
}

// stateEntry finds the first state entry of the page's history with reason.
func stateEntry(s demoState, reason string) (float64, string, bool) {
	for _, e := range s.History {
		if e.Event == "state" && e.Reason == reason {
			return e.T, e.Message, true
		}
	}
	return 0, "", false
}

// userSessions are the live sessions of user (GET /v1/users/{user}/sessions).
func userSessions(t *testing.T, ts *testServer, user string) []string {
	t.Helper()
	var out struct {
		Sessions []struct {
			Transport string `json:"transport"`
		} `json:"sessions"`
	}
	ts.do(t, "GET", "/v1/users/"+user+"/sessions", testAPIKey, nil, &out)
	var trs []string
	for _, s := range out.Sessions {
		trs = append(trs, s.Transport)
	}
	return trs
}

// TestBrowserReachUpgrade: a first browser behind a buffering nginx really
// delivers on long-poll, so the server learns "long-poll" for this network and
// browser; a second browser of the same network, whose own path carries
// WebSocket, starts on long-poll by that order (no wait before its first
// notification), probes soon after synced and is on WebSocket within 5 s,
// nothing lost or shown twice. The counting proxy in front of the second shows
// one long-poll session, one WebSocket upgrade and no SSE stream.
func TestBrowserReachUpgrade(t *testing.T) {
	t.Parallel()
	requireE2E(t, sbin("nginx"))
	e2eSlot(t)
	ts := e2eServer(t)
	ng, _ := startNginx(t, ts.Addr(), false, true)
	pre1 := publishN(t, ts, "reach1", 1)

	b := startBrowser(t)
	b.launch("a", "")
	b.open("a", "p1", demoURL("http://"+ng.addr(), "reach1", nil))
	s1 := waitConnected(t, b, "p1", 20*time.Second)
	if s1.Transport != "longpoll" {
		t.Fatalf("first browser connected over %s, want longpoll; %s", s1.Transport, s1.brief())
	}
	live1 := publishN(t, ts, "reach1", 2)
	s1 = waitExactly(t, b, "p1", ids(append(pre1, live1...)...), 15*time.Second)
	// Probed soon after synced (and failed: nginx passes neither), then backed off to 30 s.
	waitFor(t, 10*time.Second, "first browser probed once, then backed off", func() (bool, string) {
		s1 = b.demo("p1")
		var delays []int64
		for _, e := range s1.History {
			if e.Event == "probe_scheduled" && e.Delay != nil {
				delays = append(delays, *e.Delay)
			}
		}
		ok := len(delays) >= 2 && delays[0] <= 2000 && delays[1] >= 24000 && len(attempts(s1, "probe")) >= 1
		return ok, fmt.Sprintf("probe delays %v, probes %v; %s", delays, attempts(s1, "probe"), s1.brief())
	})
	if probes := attempts(s1, "probe"); slices.Contains(probes, "websocket:ok") || slices.Contains(probes, "sse:ok") {
		t.Errorf("first browser's probes = %v, want all failed behind the buffering nginx", probes)
	}
	if s1.Transport != "longpoll" {
		t.Errorf("first browser ended on %s, want longpoll", s1.Transport)
	}
	if l := ng.log("access.log"); strings.Count(l, "GET /v1/poll") < 2 || strings.Contains(l, "GET /v1/ws?") && strings.Contains(l, "\" 101 ") {
		t.Errorf("nginx's access log does not show polls and no upgrade:\n%s", l)
	}

	// The server learned long-poll from the first browser's deliveries.
	var ua string
	b.eval("p1", `navigator.userAgent`, &ua)
	waitFor(t, 10*time.Second, "the negotiator puts long-poll first", func() (bool, string) {
		req, _ := http.NewRequest("GET", ts.URL+"/v1/negotiate", nil)
		req.Header.Set("Authorization", "Bearer "+ts.token(t, "reach-check"))
		req.Header.Set("User-Agent", ua)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return false, err.Error()
		}
		defer resp.Body.Close()
		raw, _ := io.ReadAll(resp.Body)
		return strings.Contains(string(raw), `"order":["longpoll"`) && strings.Contains(string(raw), `"learned":true`), string(raw)
	})

	// The second browser: same network (loopback), a path that carries WebSocket.
	cp := startCountingProxy(t, ts.Addr())
	pre2 := publishN(t, ts, "reach2", 2)
	b.launch("b", "")
	b.open("b", "p2", demoURL(cp.URL, "reach2", nil))
	s2 := waitTransport(t, b, "p2", "websocket", 10*time.Second)
	if got := attempts(s2, "attempt"); !slices.Equal(got, []string{"longpoll:ok"}) {
		t.Errorf("second browser attempts = %v, want long-poll at once (the learned order)", got)
	}
	for _, e := range s2.History {
		if e.Event == "order" && (e.Source != "learned" || len(e.Order) == 0 || e.Order[0] != "longpoll") {
			t.Errorf("second browser's order = %v (%s), want learned, long-poll first", e.Order, e.Source)
		}
	}
	if got := attempts(s2, "probe"); !slices.Equal(got, []string{"websocket:ok"}) {
		t.Errorf("second browser probes = %v, want websocket at the first probe", got)
	}
	at, msg, ok := stateEntry(s2, "upgrade")
	if !ok || msg != "upgrade from longpoll" {
		t.Fatalf("no upgrade from longpoll in the history: %s", s2.brief())
	}
	if took := at - s2.Timings.Start; took > 5000 {
		t.Errorf("on websocket %.0f ms after start, want within 5 s", took)
	} else {
		t.Logf("E2E-TIMING case=reach-upgrade on_websocket_since_connect=%.0fms first_notification_since_connect=%.0fms",
			took, s2.Timings.FirstNotification-s2.Timings.Start)
	}
	live2 := publishN(t, ts, "reach2", 3)
	s2 = waitExactly(t, b, "p2", ids(append(pre2, live2...)...), 10*time.Second)
	if s2.Transport != "websocket" {
		t.Errorf("second browser ended on %s, want websocket", s2.Transport)
	}
	// The replayed ones came on long-poll, before the upgrade (no added wait).
	for _, r := range s2.Received {
		if slices.Contains(ids(pre2...), r.ID) && r.T > at {
			t.Errorf("replayed notification %d arrived after the upgrade", r.Seq)
		}
	}
	waitFor(t, 10*time.Second, "one session left, on websocket", func() (bool, string) {
		trs := userSessions(t, ts, "reach2")
		return slices.Equal(trs, []string{"websocket"}), fmt.Sprint(trs)
	})
	if c := cp.counts(); c.WSUpgrades != 1 || c.SSEStreams != 0 || c.NewSessions != 1 || c.PollsNow != 0 {
		t.Errorf("second browser's path saw %+v, want 1 WebSocket upgrade, no SSE stream, 1 long-poll session, no poll waiting", c)
	}
}

// openTabs opens n demo pages of user in context ctx (names prefix0..), each
// with opts, and waits until each is connected over transport.
func openTabs(t *testing.T, b *browser, ctx, prefix, base, user string, n int, opts url.Values, transport string) []string {
	t.Helper()
	var pages []string
	for i := 0; i < n; i++ {
		name := fmt.Sprintf("%s%d", prefix, i)
		b.open(ctx, name, demoURL(base, user, opts))
		pages = append(pages, name)
	}
	for _, p := range pages {
		waitTransport(t, b, p, transport, 20*time.Second)
	}
	return pages
}

// followers are the pages whose client follows another tab's connection.
func followers(t *testing.T, b *browser, pages []string) (lead []string, follow []string) {
	t.Helper()
	for _, p := range pages {
		var f bool
		b.eval(p, `window.notifyDemo.client.follower`, &f)
		if f {
			follow = append(follow, p)
		} else {
			lead = append(lead, p)
		}
	}
	return lead, follow
}

// TestBrowserSharedTabs: eight tabs of one browser on long-poll share one
// connection (one tab leads, seven follow: the server sees one session and one
// poll at a time), so an application request from a ninth tab gets through at
// once (eight polls of their own would hold all six connections Chromium
// allows per host). The leading tab is closed mid-stream: another takes over
// with its cursor, and every remaining tab gets every notification exactly
// once; presence shows one session for the browser; markRead from a follower
// reaches every tab.
func TestBrowserSharedTabs(t *testing.T) {
	t.Parallel()
	requireE2E(t)
	e2eSlot(t)
	ts := e2eServer(t)
	cp := startCountingProxy(t, ts.Addr())
	pre := publishN(t, ts, "tabs", 2)

	b := startBrowser(t)
	b.launch("a", "")
	opts := url.Values{"transports": {"longpoll"}}
	pages := openTabs(t, b, "a", "tab", cp.URL, "tabs", 8, opts, "longpoll")
	for _, p := range pages {
		waitExactly(t, b, p, ids(pre...), 10*time.Second)
	}
	lead, follow := followers(t, b, pages)
	if len(lead) != 1 || len(follow) != 7 {
		t.Fatalf("leading tabs %v, following %v: want one leading, seven following", lead, follow)
	}
	session := b.demo(lead[0]).Session
	for _, p := range follow {
		if s := b.demo(p); s.Session != session || s.State != "connected" || s.Transport != "longpoll" {
			t.Errorf("%s shows %s over %s (session %s), want the leader's connected longpoll session %s", p, s.State, s.Transport, s.Session, session)
		}
	}
	if c := cp.counts(); c.NewSessions != 1 || c.Sessions != 1 || c.PollsNow != 1 || c.WSUpgrades != 0 || c.SSEStreams != 0 {
		t.Errorf("the server saw %+v, want one long-poll session with one poll waiting, no WebSocket, no SSE", c)
	}
	if trs := userSessions(t, ts, "tabs"); !slices.Equal(trs, []string{"longpoll"}) {
		t.Errorf("presence shows sessions %v, want one longpoll session for the browser", trs)
	}

	// A ninth tab's application request.
	b.open("a", "app", cp.URL+"/readyz")
	var app struct {
		OK bool    `json:"ok"`
		Ms float64 `json:"ms"`
	}
	b.eval("app", `(async () => { const t0 = performance.now(); const r = await fetch('/readyz', { cache: 'no-store' });
		return { ok: r.ok, ms: performance.now() - t0 }; })()`, &app)
	if !app.OK || app.Ms > 2000 {
		t.Errorf("the ninth tab's request: ok=%v after %.0f ms, want ok at once", app.OK, app.Ms)
	}
	t.Logf("ninth tab's request answered in %.0f ms", app.Ms)

	// A stream of notifications; the leading tab is closed in the middle of it.
	var (
		mu   sync.Mutex
		sent []string
		wg   sync.WaitGroup
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; i < 20; i++ {
			var p publishedNote
			if st := ts.do(t, "POST", "/v1/notifications", testAPIKey, map[string]any{"user_id": "tabs", "topic": "e2e.stream", "data": map[string]any{"i": i}}, &p); st != http.StatusCreated {
				t.Errorf("publish: %d", st)
				return
			}
			mu.Lock()
			sent = append(sent, p.ID)
			mu.Unlock()
			time.Sleep(150 * time.Millisecond)
		}
	}()
	time.Sleep(1000 * time.Millisecond)
	b.must(map[string]any{"cmd": "close", "page": lead[0]})
	closedAt := time.Now()
	remaining := slices.DeleteFunc(slices.Clone(pages), func(p string) bool { return p == lead[0] })
	var newLead []string
	waitFor(t, 5*time.Second, "another tab leads", func() (bool, string) {
		newLead, _ = followers(t, b, remaining)
		return len(newLead) == 1 && b.demo(newLead[0]).State == "connected", fmt.Sprint(newLead)
	})
	nl := b.demo(newLead[0])
	takeoverAt, _, ok := stateEntry(nl, "takeover")
	if !ok {
		t.Errorf("the new leader's history has no takeover: %s", nl.brief())
	}
	connectedAt := 0.0
	for _, e := range nl.History {
		if e.Event == "state" && e.State == "connected" && e.T >= takeoverAt && connectedAt == 0 {
			connectedAt = e.T
		}
	}
	t.Logf("E2E-TIMING case=shared-takeover seen_leading_after=%s takeover_to_connected=%.0fms",
		time.Since(closedAt).Round(time.Millisecond), connectedAt-takeoverAt)
	t.Logf("the new leader: %s", nl.brief())
	wg.Wait()
	want := append(ids(pre...), sent...)
	for _, p := range remaining {
		s := waitExactly(t, b, p, want, 15*time.Second)
		if s.State != "connected" || s.Transport != "longpoll" {
			t.Errorf("%s ended %s over %s, want connected over longpoll", p, s.State, s.Transport)
		}
	}
	c := cp.counts()
	if c.WSUpgrades != 0 || c.SSEStreams != 0 || c.PollsNow != 1 || c.NewSessions+c.Sessions > 3 {
		t.Errorf("the server saw %+v, want no WebSocket, no SSE, one poll waiting, the shared session resumed (or one new)", c)
	}
	waitFor(t, 10*time.Second, "presence: one session for the browser", func() (bool, string) {
		trs := userSessions(t, ts, "tabs")
		return slices.Equal(trs, []string{"longpoll"}), fmt.Sprint(trs)
	})

	// markRead from a following tab: every tab hears of it.
	_, follow = followers(t, b, remaining)
	if len(follow) == 0 {
		t.Fatal("no following tab left")
	}
	var readOut struct {
		Unread int `json:"unread"`
	}
	b.eval(follow[0], fmt.Sprintf(`window.notifyDemo.client.markRead([%q])`, pre[0].ID), &readOut)
	wantUnread := int64(len(want) - 1)
	for _, p := range remaining {
		waitFor(t, 5*time.Second, p+" shows the read", func() (bool, string) {
			var shown int
			b.eval(p, fmt.Sprintf(`document.querySelectorAll('#notes li.read[data-id=%q]').length`, pre[0].ID), &shown)
			s := b.demo(p)
			return shown == 1 && s.Unread != nil && *s.Unread == wantUnread, fmt.Sprintf("shown read %d, unread %v", shown, s.Unread)
		})
	}
	for _, p := range remaining {
		noConsoleErrors(t, b, p)
	}
}

// TestBrowserUnsharedTabs: with share=0 each tab holds a long-poll of its own
// (the server sees one session per tab), and six of them take every
// connection Chromium allows per host: another tab's application request
// waits. This is what TestBrowserSharedTabs' ninth tab would meet without
// sharing.
func TestBrowserUnsharedTabs(t *testing.T) {
	t.Parallel()
	requireE2E(t)
	e2eSlot(t)
	ts := e2eServer(t)
	cp := startCountingProxy(t, ts.Addr())
	pre := publishN(t, ts, "solo", 1)

	b := startBrowser(t)
	b.launch("a", "")
	// Opened first: once the polls hold every connection, even loading a page of this host waits.
	b.open("a", "app", cp.URL+"/readyz")
	opts := url.Values{"transports": {"longpoll"}, "share": {"0"}, "helloTimeout": {"8000"}}
	pages := openTabs(t, b, "a", "solo", cp.URL, "solo", 6, opts, "longpoll")
	for _, p := range pages {
		waitExactly(t, b, p, ids(pre...), 10*time.Second)
	}
	if _, follow := followers(t, b, pages); len(follow) != 0 {
		t.Errorf("tabs %v follow another tab with share=0", follow)
	}
	waitFor(t, 10*time.Second, "six polls waiting", func() (bool, string) {
		c := cp.counts()
		return c.NewSessions == 6 && c.PollsNow == 6, fmt.Sprintf("%+v", c)
	})
	if trs := userSessions(t, ts, "solo"); len(trs) != 6 {
		t.Errorf("presence shows sessions %v, want one per tab", trs)
	}
	var app struct {
		OK      bool    `json:"ok"`
		Aborted bool    `json:"aborted"`
		Ms      float64 `json:"ms"`
	}
	b.eval("app", `(async () => { const t0 = performance.now(); const ac = new AbortController(); setTimeout(() => ac.abort(), 3000);
		try { const r = await fetch('/readyz', { cache: 'no-store', signal: ac.signal }); return { ok: r.ok, aborted: false, ms: performance.now() - t0 }; }
		catch { return { ok: false, aborted: true, ms: performance.now() - t0 }; } })()`, &app)
	if !app.Aborted {
		t.Errorf("the application request got through in %.0f ms (ok=%v) with six unshared polls waiting, want it stuck for 3 s", app.Ms, app.OK)
	}
	if c := cp.counts(); c.WSUpgrades != 0 || c.SSEStreams != 0 {
		t.Errorf("the server saw %+v, want long-poll only", c)
	}
}

// TestBrowserSharedFreeze: the leading tab freezes (the page lifecycle
// `freeze` event, which Chromium fires before it freezes a background tab; the
// test dispatches it, as headless Chromium freezes no page): it gives the lead
// up at once, another tab takes over and the active tabs keep getting every
// notification; on `resume` the tab follows and catches up, each notification
// once.
func TestBrowserSharedFreeze(t *testing.T) {
	t.Parallel()
	requireE2E(t)
	e2eSlot(t)
	testSharedLeaderGone(t, "frost", `document.dispatchEvent(new Event('freeze'))`, `document.dispatchEvent(new Event('resume'))`, 2*time.Second)
}

// TestBrowserSharedHungLeader: the leading tab hangs for 6 s (a busy loop; its
// heartbeats stop as a frozen tab's do): a following tab steals the lock
// within a few seconds and carries on; when the hung tab runs again it steps
// down, follows and catches up, each notification once.
func TestBrowserSharedHungLeader(t *testing.T) {
	t.Parallel()
	requireE2E(t)
	e2eSlot(t)
	testSharedLeaderGone(t, "hung", `setTimeout(() => { const end = Date.now() + 6000; while (Date.now() < end) { /* hung */ } }, 0)`, "", 6*time.Second)
}

// testSharedLeaderGone runs three tabs of user on long-poll, takes the
// leader away with the script gone (and brings it back with back, or by
// waiting), and checks the lead moves within within and nothing is lost or
// shown twice in any tab.
func testSharedLeaderGone(t *testing.T, user, gone, back string, within time.Duration) {
	ts := e2eServer(t)
	cp := startCountingProxy(t, ts.Addr())
	pre := publishN(t, ts, user, 1)

	b := startBrowser(t)
	b.launch("a", "")
	opts := url.Values{"transports": {"longpoll"}}
	pages := openTabs(t, b, "a", user, cp.URL, user, 3, opts, "longpoll")
	for _, p := range pages {
		waitExactly(t, b, p, ids(pre...), 10*time.Second)
	}
	lead, _ := followers(t, b, pages)
	if len(lead) != 1 {
		t.Fatalf("leading tabs %v, want one", lead)
	}
	old := lead[0]
	b.eval(old, gone, nil)
	goneAt := time.Now()
	active := slices.DeleteFunc(slices.Clone(pages), func(p string) bool { return p == old })
	waitFor(t, within, "an active tab leads", func() (bool, string) {
		l, _ := followers(t, b, active)
		return len(l) == 1 && b.demo(l[0]).State == "connected", fmt.Sprint(l)
	})
	t.Logf("E2E-TIMING case=shared-%s new_leader_after=%s", user, time.Since(goneAt).Round(time.Millisecond))
	during := publishN(t, ts, user, 3)
	for _, p := range active {
		waitExactly(t, b, p, ids(append(pre, during...)...), 10*time.Second)
	}
	if back != "" {
		b.eval(old, back, nil)
	}
	after := publishN(t, ts, user, 2)
	all := ids(slices.Concat(pre, during, after)...)
	for _, p := range pages {
		s := waitExactly(t, b, p, all, 15*time.Second)
		if s.State != "connected" || s.Transport != "longpoll" {
			t.Errorf("%s ended %s over %s, want connected over longpoll", p, s.State, s.Transport)
		}
	}
	if l, _ := followers(t, b, pages); len(l) != 1 || l[0] == old {
		t.Errorf("leading tabs %v once the old leader is back, want one, not the old leader", l)
	}
	waitFor(t, 10*time.Second, "one poll waiting, one session", func() (bool, string) {
		c := cp.counts()
		trs := userSessions(t, ts, user)
		return c.PollsNow == 1 && slices.Equal(trs, []string{"longpoll"}), fmt.Sprintf("%+v %v", c, trs)
	})
	if c := cp.counts(); c.WSUpgrades != 0 || c.SSEStreams != 0 {
		t.Errorf("the server saw %+v, want long-poll only", c)
	}
}

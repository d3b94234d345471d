package main

// Browser end-to-end tests: Debian's chromium, driven by playwright-core
// (static/e2e/drive.mjs), loads the demo page (static/index.html) and its
// client (static/notify.js) from notifyd, directly or through real nginx and
// squid processes, and each case asserts the transport the client ends on and
// the exact set of notifications the page received. `make test` installs the
// tools (.ci/e2e-deps) and sets NOTIFYD_E2E=1, so there they never skip.
//
// NOTIFYD_E2E_LADDER=websocket,sse (for example) restricts the client's ladder
// on every page: with a step switched off, the case that needs it fails.

import (
	"context"
	"fmt"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/notifyd/notifyd/store/storetest"
)

// e2eServer is an in-process notifyd in dev mode (the demo page signs in with
// GET /v1/dev/token) that trusts X-Forwarded-For from loopback proxies.
func e2eServer(t *testing.T) *testServer {
	t.Helper()
	return startServer(t, func(c *Config) {
		c.Dev = true
		c.TrustedProxies = []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}
	})
}

// demoURL is the demo page for user on base, with client options as query
// parameters (and NOTIFYD_E2E_LADDER as transports).
func demoURL(base, user string, opts url.Values) string {
	q := url.Values{"user": {user}, "backoffMax": {"2000"}}
	for k, v := range opts {
		q[k] = v
	}
	if l := os.Getenv("NOTIFYD_E2E_LADDER"); l != "" {
		q.Set("transports", l)
	}
	return base + "/?" + q.Encode()
}

// direct are the client options of the cases without a proxy: they are not
// about the hello timer, so a loaded machine gets more time before the client
// falls back.
var direct = url.Values{"helloTimeout": {"8000"}}

// waitConnected waits until the page's client is connected and returns its state.
func waitConnected(t *testing.T, b *browser, page string, timeout time.Duration) demoState {
	t.Helper()
	var s demoState
	waitFor(t, timeout, "page connected", func() (bool, string) {
		s = b.demo(page)
		return s.State == "connected", s.brief()
	})
	return s
}

// waitTransport waits until the page is connected over transport.
func waitTransport(t *testing.T, b *browser, page, transport string, timeout time.Duration) demoState {
	t.Helper()
	var s demoState
	waitFor(t, timeout, "connected over "+transport, func() (bool, string) {
		s = b.demo(page)
		return s.State == "connected" && s.Transport == transport, s.brief()
	})
	return s
}

// waitExactly waits until the page has received every id in want, then checks
// it received nothing else and nothing twice.
func waitExactly(t *testing.T, b *browser, page string, want []string, timeout time.Duration) demoState {
	t.Helper()
	var s demoState
	waitFor(t, timeout, fmt.Sprintf("%d notifications received", len(want)), func() (bool, string) {
		s = b.demo(page)
		got := map[string]bool{}
		for _, r := range s.Received {
			got[r.ID] = true
		}
		for _, id := range want {
			if !got[id] {
				return false, fmt.Sprintf("missing %s; %s", id, s.brief())
			}
		}
		return true, ""
	})
	// Anything late would show up now.
	time.Sleep(300 * time.Millisecond)
	s = b.demo(page)
	seen := map[string]int{}
	for _, r := range s.Received {
		seen[r.ID]++
	}
	wantSet := map[string]bool{}
	for _, id := range want {
		wantSet[id] = true
	}
	for id, n := range seen {
		if n > 1 {
			t.Errorf("notification %s shown %d times", id, n)
		}
		if !wantSet[id] {
			t.Errorf("notification %s was never published for this user", id)
		}
	}
	if len(s.Received) != len(want) {
		t.Errorf("received %d notifications, want exactly %d", len(s.Received), len(want))
	}
	return s
}

func ids(ns ...publishedNote) []string {
	out := make([]string, len(ns))
	for i, n := range ns {
		out[i] = n.ID
	}
	return out
}

func publishN(t *testing.T, ts *testServer, user string, n int) []publishedNote {
	t.Helper()
	out := make([]publishedNote, n)
	for i := range out {
		out[i] = ts.publish(t, user, "e2e.test", map[string]any{"n": i})
	}
	return out
}

// logTiming reports the time to first notification as the browser measured it.
func logTiming(t *testing.T, name string, s demoState) {
	t.Helper()
	t.Logf("E2E-TIMING case=%s transport=%s first_notification_since_navigation=%.0fms since_connect=%.0fms hello_since_connect=%.0fms",
		name, s.Transport, s.Timings.FirstNotification, s.Timings.FirstNotification-s.Timings.Start, s.Timings.Hello-s.Timings.Start)
}

// attempts lists the ladder attempts (not probes) of the page's history as "transport:ok|reason".
func attempts(s demoState, role string) []string {
	var out []string
	for _, e := range s.History {
		if e.Event == "attempt" && e.Role == role {
			r := e.Reason
			if e.OK {
				r = "ok"
			}
			out = append(out, e.Transport+":"+r)
		}
	}
	return out
}

func noConsoleErrors(t *testing.T, b *browser, page string) {
	t.Helper()
	if errs := b.consoleErrors(page); len(errs) > 0 {
		t.Errorf("%s logged console errors:\n%s", page, strings.Join(errs, "\n"))
	}
}

// TestBrowserDirect: no proxy, the client ends on WebSocket; the demo page
// shows replayed and live notifications, marks read (here and from another
// device), publishes a test notification; the dashboard shows the session.
// Both pages load without console errors; screenshots go to static/e2e/artifacts.
func TestBrowserDirect(t *testing.T) {
	t.Parallel()
	requireE2E(t)
	e2eSlot(t)
	ts := e2eServer(t)
	pre := publishN(t, ts, "alice", 2)

	b := startBrowser(t)
	b.launch("a", "")
	b.open("a", "demo", demoURL(ts.URL, "alice", direct))
	s := waitTransport(t, b, "demo", "websocket", 15*time.Second)
	if got := attempts(s, "attempt"); !slices.Equal(got, []string{"websocket:ok"}) {
		t.Errorf("attempts = %v, want websocket at once", got)
	}
	live := publishN(t, ts, "alice", 3)
	want := ids(append(pre, live...)...)
	s = waitExactly(t, b, "demo", want, 10*time.Second)
	logTiming(t, "direct", s)
	for _, r := range s.Received {
		if r.Replayed != slices.Contains(ids(pre...), r.ID) {
			t.Errorf("notification %d: replayed=%v", r.Seq, r.Replayed)
		}
	}

	// The page's publish button (dev mode gives it the API key).
	b.must(map[string]any{"cmd": "click", "page": "demo", "selector": "#publish"})
	var inbox struct {
		Notifications []struct {
			ID    string `json:"id"`
			Topic string `json:"topic"`
		} `json:"notifications"`
	}
	waitFor(t, 10*time.Second, "demo.test published", func() (bool, string) {
		ts.do(t, "GET", "/v1/users/alice/notifications?limit=1", testAPIKey, nil, &inbox)
		return len(inbox.Notifications) == 1 && inbox.Notifications[0].Topic == "demo.test", fmt.Sprint(inbox)
	})
	want = append(want, inbox.Notifications[0].ID)
	s = waitExactly(t, b, "demo", want, 10*time.Second)
	waitFor(t, 5*time.Second, "unread 6", func() (bool, string) {
		s = b.demo("demo")
		return s.Unread != nil && *s.Unread == 6, s.brief()
	})

	// Mark one read from the page, one from "another device" (the API with the user's token).
	b.must(map[string]any{"cmd": "click", "page": "demo", "selector": fmt.Sprintf(`li[data-id="%s"] button`, pre[0].ID)})
	if st := ts.do(t, "POST", "/v1/users/alice/read", ts.token(t, "alice"), map[string]any{"ids": []string{live[0].ID}}, nil); st != http.StatusOK {
		t.Fatalf("read from another device: %d", st)
	}
	waitFor(t, 5*time.Second, "two read, shown as read", func() (bool, string) {
		var readOnPage int
		b.eval("demo", `document.querySelectorAll('#notes li.read').length`, &readOnPage)
		var shown string
		b.eval("demo", `document.getElementById('unread').textContent`, &shown)
		return readOnPage == 2 && shown == "4", fmt.Sprintf("read on page %d, unread shown %q", readOnPage, shown)
	})
	noConsoleErrors(t, b, "demo")
	b.screenshot("demo", "demo")

	b.open("a", "dash", ts.URL+"/dashboard.html")
	b.must(map[string]any{"cmd": "fill", "page": "dash", "selector": "#key", "value": testAPIKey})
	b.must(map[string]any{"cmd": "click", "page": "dash", "selector": "#key-form button"})
	waitFor(t, 10*time.Second, "dashboard shows the live session", func() (bool, string) {
		var d struct {
			Polls int `json:"polls"`
			WS    string
			Rows  int
		}
		b.eval("dash", `({ polls: window.notifyDashboard.polls,
			WS: document.querySelector('[data-transport=websocket]')?.textContent,
			Rows: [...document.querySelectorAll('#recent tr')].filter(r => r.textContent.includes('alice')).length })`, &d)
		return d.Polls >= 3 && d.WS == "1" && d.Rows == 1, fmt.Sprintf("%+v", d)
	})
	// Some traffic for the deliveries-per-second chart and the latency percentiles.
	for i := 0; i < 15; i++ {
		ts.publish(t, "alice", "e2e.burst", map[string]any{"i": i})
		time.Sleep(100 * time.Millisecond)
	}
	waitFor(t, 10*time.Second, "dashboard counts the burst", func() (bool, string) {
		var deliveries int
		b.eval("dash", `window.notifyDashboard.stats.deliveries`, &deliveries)
		return deliveries >= 21, fmt.Sprint("deliveries ", deliveries)
	})
	time.Sleep(1500 * time.Millisecond)
	noConsoleErrors(t, b, "dash")
	b.screenshot("dash", "dashboard")
}

// TestBrowserServerRestart: notifyd (a child process on a fixed port) gets
// SIGTERM: the page gets bye shutdown, waits retry_ms before its next try,
// reconnects once the server is back and replays what was committed (by SQL)
// while it was down.
func TestBrowserServerRestart(t *testing.T) {
	t.Parallel()
	requireE2E(t)
	e2eSlot(t)
	dbURL := storetest.URL(t)
	srv := startChildServer(t, dbURL)
	api := &testServer{URL: "http://" + srv.addr}
	pre := publishN(t, api, "erin", 1)

	b := startBrowser(t)
	b.launch("a", "")
	b.open("a", "p", demoURL(api.URL, "erin", url.Values{"backoffMax": {"1000"}, "helloTimeout": direct["helloTimeout"]}))
	waitTransport(t, b, "p", "websocket", 15*time.Second)
	before := publishN(t, api, "erin", 1)
	waitExactly(t, b, "p", ids(append(pre, before...)...), 10*time.Second)

	srv.sigterm()
	// Committed while notifyd is down: the application's own SQL path.
	var during []string
	conn, err := pgx.Connect(shortCtx(t), dbURL)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ {
		var id string
		if err := conn.QueryRow(shortCtx(t), `INSERT INTO notifications (user_id, topic, data) VALUES ('erin', 'e2e.sql', '{}') RETURNING id::text`).Scan(&id); err != nil {
			t.Fatal(err)
		}
		during = append(during, id)
	}
	conn.Close(context.Background())
	srv.start()
	s := waitTransport(t, b, "p", "websocket", 20*time.Second)
	after := publishN(t, api, "erin", 1)
	s = waitExactly(t, b, "p", slices.Concat(ids(pre...), ids(before...), during, ids(after...)), 15*time.Second)

	// The bye's retry_ms was honoured: the next try came no sooner.
	byeAt, next := -1, -1
	for i, e := range s.History {
		if e.Event == "state" && e.Reason == "shutdown" && e.Message == "bye shutdown" && byeAt < 0 {
			byeAt = i
		} else if byeAt >= 0 && e.Event == "state" && e.Reason == "retry" {
			next = i
			break
		}
	}
	if byeAt < 0 || next < 0 {
		t.Fatalf("no bye shutdown followed by a retry in the history: %s", s.brief())
	}
	bye, retry := s.History[byeAt], s.History[next]
	if bye.Delay == nil || *bye.Delay < 1000 || *bye.Delay > 2000 {
		t.Errorf("retry_ms = %v, want 1000-2000 (PROTOCOL.md)", bye.Delay)
	} else if waited := retry.T - bye.T; waited < float64(*bye.Delay)-2 {
		t.Errorf("retried %.0f ms after bye, retry_ms was %d", waited, *bye.Delay)
	} else {
		t.Logf("bye shutdown retry_ms=%d; next try after %.0f ms", *bye.Delay, waited)
	}
}

// TestBrowserGapFill: a notification whose commit signal never reaches the
// server (its NOTIFY trigger is off for that insert) leaves a live seq gap;
// the client fetches it from the inbox without dropping the connection.
func TestBrowserGapFill(t *testing.T) {
	t.Parallel()
	requireE2E(t)
	e2eSlot(t)
	ts := e2eServer(t)
	b := startBrowser(t)
	b.launch("a", "")
	b.open("a", "p", demoURL(ts.URL, "gina", direct))
	s := waitTransport(t, b, "p", "websocket", 15*time.Second)
	session := s.Session
	first := ts.publish(t, "gina", "e2e.live", nil)
	waitExactly(t, b, "p", ids(first), 10*time.Second)

	conn, err := pgx.Connect(shortCtx(t), ts.DBURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	tx, err := conn.Begin(shortCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	var silent string
	for _, q := range []string{`ALTER TABLE notifications DISABLE TRIGGER notifications_notify`,
		`INSERT INTO notifications (user_id, topic, data) VALUES ('gina', 'e2e.silent', '{}') RETURNING id::text`,
		`ALTER TABLE notifications ENABLE TRIGGER notifications_notify`} {
		if strings.HasPrefix(q, "INSERT") {
			err = tx.QueryRow(shortCtx(t), q).Scan(&silent)
		} else {
			_, err = tx.Exec(shortCtx(t), q)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := tx.Commit(shortCtx(t)); err != nil {
		t.Fatal(err)
	}
	last := ts.publish(t, "gina", "e2e.live", nil)
	s = waitExactly(t, b, "p", []string{first.ID, silent, last.ID}, 10*time.Second)
	for _, r := range s.Received {
		if (r.ID == silent) != r.Recovered {
			t.Errorf("notification %d recovered=%v", r.Seq, r.Recovered)
		}
	}
	if s.Session != session || s.State != "connected" {
		t.Errorf("the connection changed: session %s -> %s, state %s", session, s.Session, s.State)
	}
}

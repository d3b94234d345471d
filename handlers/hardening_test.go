package handlers

import (
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"testing/fstest"
	"time"

	"github.com/notifyd/notifyd/handlers/realtime"
)

// TestParseWaitOverflow: a wait whose seconds overflow a time.Duration is
// 400, not a short wait. Failed before the fix: 18446744074 s wrapped to 0.29 s
// and was accepted.
func TestParseWaitOverflow(t *testing.T) {
	for _, v := range []string{"18446744074", "9223372037", "61", "-1", "x"} {
		if d, err := parseWait(v); err == nil {
			t.Errorf("parseWait(%q) = %s, want a 400 error", v, d)
		}
	}
	for v, want := range map[string]time.Duration{"": pollDefaultWait, "0": 0, "60": time.Minute} {
		if d, err := parseWait(v); err != nil || d != want {
			t.Errorf("parseWait(%q) = %s, %v; want %s", v, d, err, want)
		}
	}
}

// testAPI is a router with a hub, the test secrets and a few static pages.
func testAPI(t *testing.T, opt Options) (http.Handler, *realtime.Hub, *Auth) {
	t.Helper()
	hub := realtime.NewHub(realtime.Config{PingInterval: time.Second, PingTimeout: 3 * time.Second}, realtime.Hooks{})
	auth := NewAuth(testSecret, testAPIKey, nil)
	opt.Hub, opt.Auth, opt.Log = hub, auth, slog.New(slog.DiscardHandler)
	h := New(opt)
	return h, hub, auth
}

func serve(h http.Handler, method, path, bearer string) *httptest.ResponseRecorder {
	req := httptest.NewRequest(method, path, strings.NewReader(`{"type":"ping"}`))
	if bearer != "" {
		req.Header.Set("Authorization", "Bearer "+bearer)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return rec
}

// TestOtherUsersSessionIsUnknown: another user's live session answers exactly
// as an unknown session id (404 unknown_session) on the messages endpoint and
// on kick, so session ids cannot be probed. Failed before the fix: 403.
func TestOtherUsersSessionIsUnknown(t *testing.T) {
	h, hub, auth := testAPI(t, Options{})
	s := hub.NewSession(realtime.SessionInfo{User: "owner", Transport: realtime.SSE}, 0)
	if err := hub.Register(s, ""); err != nil {
		t.Fatal(err)
	}
	defer hub.End(s, realtime.ReasonClientClose)
	intruder, err := auth.NewToken("intruder", "", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ method, path string }{
		{http.MethodPost, "/v1/sessions/" + s.ID + "/messages"},
		{http.MethodDelete, "/v1/sessions/" + s.ID},
	} {
		other := serve(h, c.method, c.path, intruder)
		unknown := serve(h, c.method, strings.Replace(c.path, s.ID, "no-such-session", 1), intruder)
		if other.Code != http.StatusNotFound || other.Body.String() != unknown.Body.String() {
			t.Errorf("%s %s of another user: %d %s; unknown id: %d %s", c.method, c.path, other.Code, other.Body.String(), unknown.Code, unknown.Body.String())
		}
	}
	if _, ok := hub.Session(s.ID); !ok {
		t.Fatal("the intruder's kick ended the owner's session")
	}
}

// TestSecurityHeaders: the static pages carry a CSP that forbids framing and
// inline scripts, nosniff, X-Frame-Options and a Referrer-Policy; JSON answers carry nosniff,
// and the API's are uncacheable.
// Failed before the fix: none of these headers were set.
func TestSecurityHeaders(t *testing.T) {
	pages := fstest.MapFS{"index.html": {Data: []byte("<html></html>")}, "dashboard.html": {Data: []byte("<html></html>")}}
	h, _, _ := testAPI(t, Options{Static: pages})
	for _, path := range []string{"/", "/dashboard.html"} {
		rec := serve(h, http.MethodGet, path, "")
		hd := rec.Header()
		if rec.Code != http.StatusOK || !strings.Contains(hd.Get("Content-Security-Policy"), "frame-ancestors 'none'") ||
			!strings.Contains(hd.Get("Content-Security-Policy"), "script-src 'self'") ||
			hd.Get("X-Content-Type-Options") != "nosniff" || hd.Get("Referrer-Policy") == "" || hd.Get("X-Frame-Options") != "DENY" {
			t.Errorf("GET %s: %d, headers %v", path, rec.Code, hd)
		}
	}
	for _, path := range []string{"/healthz", "/v1/stats"} {
		rec := serve(h, http.MethodGet, path, "")
		if rec.Header().Get("X-Content-Type-Options") != "nosniff" || !strings.HasPrefix(rec.Header().Get("Content-Type"), "application/json") {
			t.Errorf("GET %s: %d, headers %v", path, rec.Code, rec.Header())
		}
	}
	rec := serve(h, http.MethodGet, "/v1/stats", "")
	if hd := rec.Header(); !strings.Contains(hd.Get("Cache-Control"), "no-store") || hd.Get("Pragma") != "no-cache" ||
		hd.Get("Expires") != "Thu, 01 Jan 1970 00:00:00 GMT" || hd.Get("X-Accel-Expires") != "0" {
		t.Errorf("GET /v1/stats: headers %v, want them uncacheable", hd)
	}
}

// TestMetricsAccess: /metrics is behind the API key by default, open with
// MetricsPublic and absent with MetricsOff (served on the debug listener).
// Failed before the fix: anyone read it.
func TestMetricsAccess(t *testing.T) {
	for _, c := range []struct {
		name               string
		access             MetricsAccess
		anonymous, withKey int
	}{
		{"default (api-key)", MetricsAPIKey, http.StatusUnauthorized, http.StatusOK},
		{"public", MetricsPublic, http.StatusOK, http.StatusOK},
		{"debug only", MetricsOff, http.StatusNotFound, http.StatusNotFound},
	} {
		hub := realtime.NewHub(realtime.Config{PingInterval: time.Second, PingTimeout: 3 * time.Second}, realtime.Hooks{})
		h, _, _ := testAPI(t, Options{Metrics: NewMetrics(hub), MetricsAccess: c.access})
		if rec := serve(h, http.MethodGet, "/metrics", ""); rec.Code != c.anonymous {
			t.Errorf("%s: anonymous GET /metrics: %d, want %d", c.name, rec.Code, c.anonymous)
		}
		if rec := serve(h, http.MethodGet, "/metrics?token="+testAPIKey, ""); rec.Code != c.anonymous {
			t.Errorf("%s: GET /metrics?token=<API key>: %d, want %d", c.name, rec.Code, c.anonymous)
		}
		rec := serve(h, http.MethodGet, "/metrics", testAPIKey)
		if rec.Code != c.withKey || (c.withKey == http.StatusOK && !strings.Contains(rec.Body.String(), "notifyd_sessions")) {
			t.Errorf("%s: GET /metrics with the key: %d, want %d", c.name, rec.Code, c.withKey)
		}
	}
}

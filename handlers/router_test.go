package handlers

import (
	"bytes"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/notifyd/notifyd/handlers/realtime"
)

// TestRequestLogsCarryNoToken: a token in the query string (as browsers send
// it to /v1/ws and /v1/sse) never reaches the logs, even at debug level.
func TestRequestLogsCarryNoToken(t *testing.T) {
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	hub := realtime.NewHub(realtime.Config{PingInterval: time.Second, PingTimeout: 3 * time.Second}, realtime.Hooks{})
	auth := NewAuth("test-secret-0123456789abcdef", "test-api-key-0123456789abcdef", nil)
	tok, err := auth.NewToken("alice", "", -time.Minute) // expired: refused before any database work
	if err != nil {
		t.Fatal(err)
	}
	h := New(Options{Hub: hub, Auth: auth, Log: log})
	for _, path := range []string{"/v1/ws?token=" + tok, "/healthz?token=" + tok} {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
		if path[:6] == "/v1/ws" && rec.Code != http.StatusUnauthorized {
			t.Fatalf("GET %s: %d, want 401", path[:6], rec.Code)
		}
	}
	if !strings.Contains(logs.String(), "path=/v1/ws") {
		t.Fatalf("the request was not logged:\n%s", logs.String())
	}
	if strings.Contains(logs.String(), tok) || strings.Contains(logs.String(), "token=") {
		t.Fatalf("a token reached the logs:\n%s", logs.String())
	}
}

// TestSSEWithoutHijackIs505: a stream is written on the connection itself,
// or (HTTP/2) through a ResponseWriter that flushes; where the writer can
// do neither, the client gets 505 with a JSON error, and the session it was
// given is ended, not left in presence.
func TestSSEWithoutHijackIs505(t *testing.T) {
	hub := realtime.NewHub(realtime.Config{PingInterval: time.Second, PingTimeout: 3 * time.Second}, realtime.Hooks{})
	auth := NewAuth("test-secret-0123456789abcdef", "test-api-key-0123456789abcdef", nil)
	tok, err := auth.NewToken("alice", "", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	h := New(Options{Hub: hub, Auth: auth, Log: slog.New(slog.DiscardHandler)})
	rec := httptest.NewRecorder()
	// Neither Hijack nor Flush: nothing can stream on it.
	h.ServeHTTP(struct{ http.ResponseWriter }{rec}, httptest.NewRequest(http.MethodGet, "/v1/sse?token="+tok, nil))
	if rec.Code != http.StatusHTTPVersionNotSupported || !strings.Contains(rec.Body.String(), `"http1_required"`) {
		t.Fatalf("GET /v1/sse: %d %s", rec.Code, rec.Body.String())
	}
	if st := hub.Stats(); st.Sessions != 0 {
		t.Fatalf("%d sessions left in presence", st.Sessions)
	}
}

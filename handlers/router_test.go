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
	h, _ := New(Options{Hub: hub, Auth: auth, Log: log})
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

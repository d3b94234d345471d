package handlers

import (
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/notifyd/notifyd/handlers/realtime"
)

const (
	testSecret = "test-secret-0123456789abcdef"
	testAPIKey = "test-api-key-0123456789abcdef"
)

// TestAPIKeyNotFromQuery: the API key in the query string (where it ends up
// in proxy logs and browser history) is refused; in the Authorization header
// it is accepted. Failed before the fix: ?token=<API key> read the stats.
func TestAPIKeyNotFromQuery(t *testing.T) {
	hub := realtime.NewHub(realtime.Config{PingInterval: time.Second, PingTimeout: 3 * time.Second}, realtime.Hooks{})
	h := New(Options{Hub: hub, Auth: NewAuth(testSecret, testAPIKey, nil), Log: slog.New(slog.DiscardHandler)})

	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/v1/stats?token="+testAPIKey, nil))
	if rec.Code != http.StatusUnauthorized {
		t.Fatalf("GET /v1/stats?token=<API key>: %d %s, want 401", rec.Code, rec.Body.String())
	}
	rec = httptest.NewRecorder()
	req := httptest.NewRequest(http.MethodGet, "/v1/stats", nil)
	req.Header.Set("Authorization", "Bearer "+testAPIKey)
	h.ServeHTTP(rec, req)
	if rec.Code != http.StatusOK {
		t.Fatalf("GET /v1/stats with the key as Bearer: %d %s, want 200", rec.Code, rec.Body.String())
	}
	// Client tokens still come in the query (WebSocket and EventSource cannot set headers).
	a := NewAuth(testSecret, testAPIKey, nil)
	tok, err := a.NewToken("alice", "", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if id, err := a.Client(httptest.NewRequest(http.MethodGet, "/v1/ws?token="+tok, nil)); err != nil || id.User != "alice" {
		t.Fatalf("client token in the query: %+v %v", id, err)
	}
}

// signed signs claims and header fields with the test secret.
func signed(t *testing.T, claims jwt.MapClaims, header map[string]any) string {
	t.Helper()
	tok := jwt.NewWithClaims(jwt.SigningMethodHS256, claims)
	for k, v := range header {
		tok.Header[k] = v
	}
	s, err := tok.SignedString([]byte(testSecret))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func bearerRequest(tok string) *http.Request {
	r := httptest.NewRequest(http.MethodGet, "/v1/negotiate", nil)
	r.Header.Set("Authorization", "Bearer "+tok)
	return r
}

// TestTokenCritHeaderRefused: a token whose crit header names an extension
// notifyd does not understand is refused (RFC 7515 §4.1.11). Failed before the
// fix: it was accepted.
func TestTokenCritHeaderRefused(t *testing.T) {
	a := NewAuth(testSecret, testAPIKey, nil)
	now := time.Now()
	claims := jwt.MapClaims{"sub": "alice", "iat": now.Unix(), "exp": now.Add(time.Hour).Unix()}
	if _, err := a.Client(bearerRequest(signed(t, claims, nil))); err != nil {
		t.Fatalf("plain token refused: %v", err)
	}
	_, err := a.Client(bearerRequest(signed(t, claims, map[string]any{"crit": []string{"exp-ext"}, "exp-ext": true})))
	if err == nil || !strings.Contains(err.Error(), "crit") {
		t.Fatalf("token with crit: err = %v, want a crit refusal", err)
	}
}

// TestTokenLifetimeCapped: with a maximum lifetime, a token whose exp - iat
// (or exp - now, without iat) exceeds it is refused. Failed before the fix:
// nothing capped a token's lifetime.
func TestTokenLifetimeCapped(t *testing.T) {
	a := NewAuth(testSecret, testAPIKey, nil).WithMaxTokenTTL(24 * time.Hour)
	now := time.Now()
	for _, c := range []struct {
		name   string
		claims jwt.MapClaims
		ok     bool
	}{
		{"1h", jwt.MapClaims{"sub": "alice", "iat": now.Unix(), "exp": now.Add(time.Hour).Unix()}, true},
		{"24h", jwt.MapClaims{"sub": "alice", "iat": now.Unix(), "exp": now.Add(24 * time.Hour).Unix()}, true},
		{"10 years", jwt.MapClaims{"sub": "alice", "iat": now.Unix(), "exp": now.Add(10 * 365 * 24 * time.Hour).Unix()}, false},
		{"no iat, 1h left", jwt.MapClaims{"sub": "alice", "exp": now.Add(time.Hour).Unix()}, true},
		{"no iat, a year left", jwt.MapClaims{"sub": "alice", "exp": now.Add(365 * 24 * time.Hour).Unix()}, false},
		{"old iat, 2 days", jwt.MapClaims{"sub": "alice", "iat": now.Add(-47 * time.Hour).Unix(), "exp": now.Add(time.Hour).Unix()}, false},
	} {
		_, err := a.Client(bearerRequest(signed(t, c.claims, nil)))
		if (err == nil) != c.ok {
			t.Errorf("%s: err = %v, want accepted=%v", c.name, err, c.ok)
		}
	}
	// NewToken with a lifetime within the cap is accepted.
	tok, err := a.NewToken("alice", "", 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Client(bearerRequest(tok)); err != nil {
		t.Fatalf("a 24h token: %v", err)
	}
}

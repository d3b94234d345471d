package handlers

import (
	"net/http"
	"net/http/httptest"
	"testing"
)

// Without NOTIFY_ALLOWED_ORIGINS, a page is trusted only when it was served
// under the address the request went to (an IP address or localhost): a
// DNS-rebinding page, whose Origin and Host name the attacker's domain
// alike, is refused.
func TestOriginWithoutAllowList(t *testing.T) {
	auth := NewAuth("secret-0123456789abcdef", "", nil)
	h := auth.Origins(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusOK) }))
	cases := []struct {
		host, origin string
		want         int
	}{
		{"127.0.0.1:8080", "http://127.0.0.1:8080", http.StatusOK},
		{"localhost:8080", "http://localhost:8080", http.StatusOK},
		{"[::1]:8080", "http://[::1]:8080", http.StatusOK},
		{"10.1.2.3:8080", "http://10.1.2.3:8080", http.StatusOK},
		{"evil.example:8080", "http://evil.example:8080", http.StatusForbidden}, // DNS rebinding
		{"rebind.127.0.0.1.nip.io:8080", "http://rebind.127.0.0.1.nip.io:8080", http.StatusForbidden},
		{"127.0.0.1:8080", "http://evil.example", http.StatusForbidden},
		{"127.0.0.1:8080", "http://127.0.0.1:9999", http.StatusForbidden},
		{"127.0.0.1:8080", "", http.StatusOK}, // not a browser: judged by its credentials
	}
	for _, c := range cases {
		r := httptest.NewRequest(http.MethodGet, "/v1/ws", nil)
		r.Host = c.host
		if c.origin != "" {
			r.Header.Set("Origin", c.origin)
		}
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		if w.Code != c.want {
			t.Errorf("Host %s, Origin %q: %d, want %d", c.host, c.origin, w.Code, c.want)
		}
	}
}

// An allow-list decides alone: a listed domain is accepted, and the Host match is not consulted.
func TestOriginWithAllowList(t *testing.T) {
	auth := NewAuth("secret-0123456789abcdef", "", []string{"https://app.example.com"})
	for origin, want := range map[string]bool{"https://app.example.com": true, "http://127.0.0.1:8080": false} {
		r := httptest.NewRequest(http.MethodGet, "/v1/ws", nil)
		r.Host = "127.0.0.1:8080"
		if got := auth.originAllowed(r, origin); got != want {
			t.Errorf("%s: %v, want %v", origin, got, want)
		}
	}
}

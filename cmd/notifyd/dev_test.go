package main

import (
	"bytes"
	"net/http"
	"strings"
	"testing"

	"github.com/notifyd/notifyd/handlers"
)

// The dev banner names the server's address, the API key and a token the server accepts.
func TestDevBanner(t *testing.T) {
	ts := startServer(t)
	var out bytes.Buffer
	ts.printDevBanner(&out)
	banner := out.String()
	_, port := splitHostPort(ts.Addr())
	for _, want := range []string{"http://127.0.0.1:" + port + "/dashboard.html", "API key:     " + testAPIKey,
		"websocat 'ws://127.0.0.1:" + port + "/v1/ws?token="} {
		if !strings.Contains(banner, want) {
			t.Errorf("banner lacks %q:\n%s", want, banner)
		}
	}
	_, rest, _ := strings.Cut(banner, `client token (user "dev", 24h): `)
	tok, _, _ := strings.Cut(rest, "\n")
	req, _ := http.NewRequest("GET", "/", nil)
	req.Header.Set("Authorization", "Bearer "+tok)
	if id, err := handlers.NewAuth(testSecret, testAPIKey, nil).Client(req); err != nil || id.User != "dev" || id.Device != "cli" {
		t.Fatalf("banner token: identity %+v, %v", id, err)
	}
}

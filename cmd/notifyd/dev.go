package main

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/notifyd/notifyd/handlers"
)

// printDevBanner tells a developer how to try the server.
func (m *Main) printDevBanner(w io.Writer) {
	auth := handlers.NewAuth(m.Config.JWTSecret, m.Config.APIKey, nil).WithMaxTokenTTL(m.Config.MaxTokenTTL)
	tok, err := auth.NewToken("dev", "cli", 24*time.Hour)
	if err != nil {
		return
	}
	scheme := "http://"
	if m.certs != nil {
		scheme = "https://"
	}
	base := scheme + m.Addr()
	if host, port := splitHostPort(m.Addr()); host == "::" || host == "0.0.0.0" || host == "" {
		base = scheme + "localhost:" + port
	}
	fmt.Fprintf(w, `
notifyd is running in DEV MODE on %[1]s (loopback only)
  WARNING: anyone who reaches it gets a token for any user and the API key.
  demo page:   %[1]s/
  dashboard:   %[1]s/dashboard.html
  client token (user "dev", 24h): %[2]s
  API key:     %[3]s
  connect:     websocat '%[4]s/v1/ws?token=%[2]s'
  publish:     curl -s -H 'Authorization: Bearer %[3]s' -H 'Content-Type: application/json' \
                 -d '{"user_id":"dev","topic":"hello","data":{"text":"hi"}}' %[1]s/v1/notifications

`, base, tok, m.Config.APIKey, "ws"+base[4:])
}

func splitHostPort(addr string) (host, port string) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", addr
	}
	return host, port
}

// fillDevSecrets gives a development server (NOTIFY_DEV=1) a random token secret and API key
// where none is set; printDevBanner shows them.
func (c *Config) fillDevSecrets() {
	if c.JWTSecret == "" {
		c.JWTSecret = randomHex(32)
	}
	if c.APIKey == "" {
		c.APIKey = "dev-" + randomHex(16)
	}
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

package main

import (
	"bytes"
	"net/http"
	"strings"
	"testing"

	"github.com/notifyd/notifyd/handlers"
)

// `notifyd token` prints a token the server accepts for the user and device asked.
func TestTokenCommand(t *testing.T) {
	t.Setenv("NOTIFY_JWT_SECRET", testSecret)
	var out bytes.Buffer
	if err := runToken([]string{"-user", "alice", "-device", "phone", "-ttl", "1h"}, &out); err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest("GET", "/", nil)
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(out.String()))
	id, err := handlers.NewAuth(testSecret, testAPIKey, nil).Client(req)
	if err != nil || id.User != "alice" || id.Device != "phone" {
		t.Fatalf("identity %+v, %v", id, err)
	}

	if err := runToken([]string{"-user", "bad user"}, &out); err == nil || !strings.Contains(err.Error(), "-user must be") {
		t.Fatalf("bad user: %v", err)
	}
	t.Setenv("NOTIFY_JWT_SECRET", "")
	if err := runToken([]string{"-user", "alice"}, &out); err == nil || !strings.Contains(err.Error(), "NOTIFY_JWT_SECRET is not set") {
		t.Fatalf("no secret: %v", err)
	}
}

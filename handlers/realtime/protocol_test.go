package realtime

import (
	"testing"
	"time"
)

// TestWireTime: the wire writes RFC 3339 UTC with milliseconds, the same
// bytes from WireTime and from the pong's hand-written time.
func TestWireTime(t *testing.T) {
	at := time.Date(2026, 11, 26, 22, 4, 5, 123456789, time.FixedZone("CET", 3600))
	if got := WireTime(at); got != "2026-11-26T21:04:05.123Z" {
		t.Fatalf("WireTime = %q", got)
	}
	if got, want := string(AppendPong(nil, at)), `{"type":"pong","server_time":"`+WireTime(at)+`"}`; got != want {
		t.Fatalf("AppendPong = %s, want %s", got, want)
	}
}

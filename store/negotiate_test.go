package store_test

import (
	"net/netip"
	"testing"
	"time"

	"github.com/notifyd/notifyd/store"
	"github.com/notifyd/notifyd/store/storetest"
)

// TestTransportUsersCountsUsersNotReports: many reports of one user count as
// one user (the latest report), and a user the server saw deliver over a
// transport counts as seen whatever they report of it.
func TestTransportUsersCountsUsersNotReports(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	s := storetest.New(t)
	net1 := netip.MustParsePrefix("203.0.113.0/24")
	now := time.Now()
	rep := func(user, tr string, ok bool, at time.Time) store.TransportReport {
		return store.TransportReport{Network: net1, Browser: "chrome", Transport: tr, User: user, OK: ok, Reason: "timeout", At: at}
	}
	for i := range 50 {
		if err := s.ReportTransports(ctx, []store.TransportReport{rep("mallory", "websocket", false, now.Add(time.Duration(i)*time.Millisecond))}); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.ReportTransports(ctx, []store.TransportReport{rep("carol", "websocket", true, now), rep("carol", "sse", false, now)}); err != nil {
		t.Fatal(err)
	}
	// dave reports websocket failing, but the server saw it deliver to him: he counts as seen.
	if err := s.ReportTransports(ctx, []store.TransportReport{rep("dave", "websocket", false, now)}); err != nil {
		t.Fatal(err)
	}
	for _, u := range []string{"dave", "erin"} {
		if err := s.SawTransport(ctx, rep(u, "websocket", false, now)); err != nil {
			t.Fatal(err)
		}
	}
	// Another browser family and an old report are not counted.
	other := rep("frank", "websocket", false, now)
	other.Browser = "firefox"
	if err := s.ReportTransports(ctx, []store.TransportReport{other, rep("gina", "longpoll", false, now.Add(-48*time.Hour))}); err != nil {
		t.Fatal(err)
	}
	got, err := s.TransportUsers(ctx, net1, "chrome", now.Add(-time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]store.TransportUsers{"websocket": {Seen: 2, Worked: 1, Failed: 1}, "sse": {Failed: 1}}
	if len(got) != len(want) || got["websocket"] != want["websocket"] || got["sse"] != want["sse"] {
		t.Fatalf("TransportUsers = %+v, want %+v", got, want)
	}
	if n, err := s.ForgetTransports(ctx, now.Add(-24*time.Hour)); err != nil || n != 1 {
		t.Fatalf("ForgetTransports = %d, %v; want gina's old report", n, err)
	}
}

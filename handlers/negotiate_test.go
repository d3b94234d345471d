package handlers

import (
	"bytes"
	"context"
	"log/slog"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"unicode/utf8"

	"github.com/notifyd/notifyd/handlers/realtime"
	"github.com/notifyd/notifyd/store"
)

// TestNegotiateWarnsOnPrivatePeerWithoutProxies: a client arriving from a
// private address with no trusted proxies configured (notifyd is likely behind
// a proxy whose network every client then shares) is warned about once;
// public peers and a configured proxy list are not.
func TestNegotiateWarnsOnPrivatePeerWithoutProxies(t *testing.T) {
	var logs bytes.Buffer
	n := NewNegotiator(nil, nil, slog.New(slog.NewTextHandler(&logs, nil)))
	for _, peer := range []string{"203.0.113.5:1000", "10.1.2.3:4000", "10.1.2.4:4000", "192.168.0.9:80"} {
		r := httptest.NewRequest("GET", "/v1/negotiate", nil)
		r.RemoteAddr = peer
		n.clientNetwork(r)
	}
	if got := strings.Count(logs.String(), "level=WARN"); got != 1 || !strings.Contains(logs.String(), "NOTIFY_TRUSTED_PROXIES") {
		t.Fatalf("%d warnings, want 1:\n%s", got, logs.String())
	}
	logs.Reset()
	n = NewNegotiator(nil, []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}, slog.New(slog.NewTextHandler(&logs, nil)))
	r := httptest.NewRequest("GET", "/v1/negotiate", nil)
	r.RemoteAddr = "10.1.2.3:4000"
	n.clientNetwork(r)
	if logs.Len() != 0 {
		t.Fatalf("warned with trusted proxies configured:\n%s", logs.String())
	}
}

// TestNegotiateOrder: the server's observations put a transport among those
// that worked whatever reports say; reports count users, and a tie is a success.
func TestNegotiateOrder(t *testing.T) {
	ws, sse, lp := realtime.WebSocket, realtime.SSE, realtime.LongPoll
	for _, c := range []struct {
		name  string
		users map[string]store.TransportUsers
		want  []realtime.Transport
	}{
		{"nothing known", nil, []realtime.Transport{ws, sse, lp}},
		{"reported failing", map[string]store.TransportUsers{"websocket": {Failed: 1}}, []realtime.Transport{sse, lp, ws}},
		{"seen beats reports", map[string]store.TransportUsers{"websocket": {Seen: 1, Failed: 100}}, []realtime.Transport{ws, sse, lp}},
		{"tie is a success", map[string]store.TransportUsers{"websocket": {Worked: 1, Failed: 1}, "sse": {Failed: 2, Worked: 1}}, []realtime.Transport{ws, lp, sse}},
		{"only sse seen", map[string]store.TransportUsers{"sse": {Seen: 3}}, []realtime.Transport{sse, ws, lp}},
	} {
		got, learned := order(c.users)
		if !slices.Equal(got, c.want) || learned != (len(c.users) > 0) {
			t.Errorf("%s: order %v learned %v, want %v", c.name, got, learned, c.want)
		}
	}
}

// FuzzParseOutcomes: whatever a client posts, an accepted report is 1 to 8
// known transports whose reasons Postgres can store (valid UTF-8, no NUL, at
// most 64 bytes).
func FuzzParseOutcomes(f *testing.F) {
	for _, s := range []string{`{"transport":"sse","ok":true}`, `[{"transport":"websocket","ok":false,"reason":"timeout"}]`,
		`[]`, `nope`, `{"transport":"longpoll","reason":"` + strings.Repeat("é", 40) + `"}`, `{"transport":"sse","reason":"a\u0000b\ud800"}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		outs, err := parseOutcomes(body)
		if err != nil {
			return
		}
		if len(outs) == 0 || len(outs) > 8 {
			t.Fatalf("%d outcomes accepted", len(outs))
		}
		for _, o := range outs {
			if !o.Transport.Valid() || len(o.Reason) > 64 || !utf8.ValidString(o.Reason) || strings.ContainsRune(o.Reason, 0) {
				t.Fatalf("accepted %+v", o)
			}
		}
	})
}

// sawStore counts the server observations written.
type sawStore struct {
	NegotiateStore
	mu  sync.Mutex
	saw []store.TransportReport
}

func (s *sawStore) SawTransport(_ context.Context, r store.TransportReport) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.saw = append(s.saw, r)
	return nil
}

// TestNegotiateDeliveredWritesOncePerKey: a session's many acks write one
// observation (per network, browser, transport and user, per hour), from
// many goroutines too; a session without a known network writes none.
func TestNegotiateDeliveredWritesOncePerKey(t *testing.T) {
	st := &sawStore{}
	n := NewNegotiator(st, nil, slog.New(slog.DiscardHandler))
	network := netip.MustParsePrefix("203.0.113.0/24")
	alice := &realtime.Session{SessionInfo: realtime.SessionInfo{User: "alice", Transport: realtime.SSE, Network: network, UserAgent: "Firefox/140.0"}}
	bob := &realtime.Session{SessionInfo: realtime.SessionInfo{User: "bob", Transport: realtime.SSE, Network: network}}
	unknown := &realtime.Session{SessionInfo: realtime.SessionInfo{User: "carol", Transport: realtime.SSE}}
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 500 {
				n.Delivered(alice)
				n.Delivered(bob)
				n.Delivered(unknown)
			}
		})
	}
	wg.Wait()
	if len(st.saw) != 2 {
		t.Fatalf("%d observations written, want 2: %+v", len(st.saw), st.saw)
	}
	for _, r := range st.saw {
		if r.Network != network || r.Transport != "sse" || (r.User == "alice") != (r.Browser == "firefox") {
			t.Errorf("observation %+v", r)
		}
	}
	var nilNegotiator *Negotiator
	nilNegotiator.Delivered(alice) // negotiate off: nothing to do, no panic
}

// BenchmarkNegotiateDelivered: the cost an ack pays once its session's
// observation is written (the common case), from all Ps at once.
func BenchmarkNegotiateDelivered(b *testing.B) {
	n := NewNegotiator(&sawStore{}, nil, slog.New(slog.DiscardHandler))
	s := &realtime.Session{SessionInfo: realtime.SessionInfo{User: "alice", Transport: realtime.WebSocket,
		Network: netip.MustParsePrefix("203.0.113.0/24"), UserAgent: "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0.0.0 Safari/537.36"}}
	n.Delivered(s)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			n.Delivered(s)
		}
	})
}

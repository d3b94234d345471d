package connlimit

import (
	"bufio"
	"errors"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"syscall"
	"testing"
	"time"
)

// serve accepts from l until it closes, handing admitted connections out.
func serve(t *testing.T, l *Listener) <-chan net.Conn {
	out := make(chan net.Conn, 16)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				close(out)
				return
			}
			out <- c
		}
	}()
	return out
}

func dialFrom(t *testing.T, addr, local string) net.Conn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(local)}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// refusedWith reads the answer of a refused connection: its HTTP status.
func refusedWith(t *testing.T, c net.Conn) int {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("want a refusal answer: %v", err)
	}
	resp.Body.Close()
	if resp.Header.Get("Retry-After") == "" {
		t.Error("refusal without Retry-After")
	}
	return resp.StatusCode
}

func accepted(t *testing.T, in <-chan net.Conn) net.Conn {
	t.Helper()
	select {
	case c := <-in:
		return c
	case <-time.After(5 * time.Second):
		t.Fatal("no connection admitted")
		return nil
	}
}

func TestCaps(t *testing.T) {
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := Wrap(inner, Options{Max: 3, PerAddr: 2})
	defer l.Close()
	in := serve(t, l)
	addr := l.Addr().String()

	dialFrom(t, addr, "127.0.0.2")
	a1 := accepted(t, in)
	dialFrom(t, addr, "127.0.0.2")
	accepted(t, in)
	if got := refusedWith(t, dialFrom(t, addr, "127.0.0.2")); got != http.StatusTooManyRequests {
		t.Errorf("third connection from one address: %d, want 429", got)
	}
	dialFrom(t, addr, "127.0.0.3")
	accepted(t, in)
	if got := refusedWith(t, dialFrom(t, addr, "127.0.0.4")); got != http.StatusServiceUnavailable {
		t.Errorf("connection past the global cap: %d, want 503", got)
	}
	if st := l.Stats(); st.Open != 3 || st.RefusedPerAddr != 1 || st.RefusedMax != 1 {
		t.Errorf("stats %+v; want 3 open, 1 refused per address, 1 past the cap", st)
	}
	// Closing (twice) frees one place, for the address too.
	a1.Close()
	a1.Close()
	if st := l.Stats(); st.Open != 2 {
		t.Errorf("%d open after a close; want 2", st.Open)
	}
	dialFrom(t, addr, "127.0.0.2")
	accepted(t, in)
	l.mu.Lock()
	n := l.byAddr[mustAddr("127.0.0.2")]
	l.mu.Unlock()
	if n != 2 {
		t.Errorf("127.0.0.2 counted %d times; want 2", n)
	}
}

// Exempt peers (trusted proxies) are not capped per address, only globally.
func TestExemptPeers(t *testing.T) {
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	proxy := mustAddr("127.0.0.5")
	l := Wrap(inner, Options{Max: 3, PerAddr: 1, Exempt: func(a netip.Addr) bool { return a == proxy }})
	defer l.Close()
	in := serve(t, l)
	for range 3 {
		dialFrom(t, l.Addr().String(), "127.0.0.5")
		accepted(t, in)
	}
	if got := refusedWith(t, dialFrom(t, l.Addr().String(), "127.0.0.5")); got != http.StatusServiceUnavailable {
		t.Errorf("past the global cap: %d, want 503", got)
	}
}

func mustAddr(s string) netip.Addr { return netip.MustParseAddr(s) }

// A closed listener's Accept returns at once, without pausing.
func TestAcceptAfterClose(t *testing.T) {
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var pauses int
	l := Wrap(inner, Options{sleep: func(time.Duration) { pauses++ }})
	l.Close()
	if _, err := l.Accept(); !errors.Is(err, net.ErrClosed) || pauses != 0 {
		t.Errorf("Accept after Close: %v after %d pauses; want net.ErrClosed at once", err, pauses)
	}
}

// failing is a listener whose Accept fails n times with err, then succeeds.
type failing struct {
	net.Listener
	mu  sync.Mutex
	n   int
	err error
}

func (f *failing) Accept() (net.Conn, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.n > 0 {
		f.n--
		return nil, f.err
	}
	a, _ := net.Pipe()
	return a, nil
}

// Running out of descriptors makes Accept pause, doubling, instead of spinning.
func TestAcceptErrorsBackOff(t *testing.T) {
	var pauses []time.Duration
	l := Wrap(&failing{n: 10, err: &net.OpError{Op: "accept", Err: syscall.EMFILE}},
		Options{sleep: func(d time.Duration) { pauses = append(pauses, d) }})
	c, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	want := []time.Duration{5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000}
	if len(pauses) != len(want) {
		t.Fatalf("pauses %v; want %d", pauses, len(want))
	}
	for i, w := range want {
		if pauses[i] != w*time.Millisecond {
			t.Fatalf("pauses %v; want %v ms", pauses, want)
		}
	}
	if st := l.Stats(); st.AcceptErrors != 10 {
		t.Errorf("%d accept errors counted; want 10", st.AcceptErrors)
	}
}

// tcpConn is a connection that says it comes from a TCP peer.
type tcpConn struct {
	net.Conn
	peer *net.TCPAddr
}

func (c tcpConn) RemoteAddr() net.Addr { return c.peer }
func (c tcpConn) Close() error         { return nil }

// BenchmarkAdmitRelease is the cost the caps add to a connection's accept and close.
func BenchmarkAdmitRelease(b *testing.B) {
	l := Wrap(nil, Options{Max: 1 << 20, PerAddr: 1 << 20})
	peers := make([]tcpConn, 256)
	for i := range peers {
		peers[i] = tcpConn{peer: &net.TCPAddr{IP: net.IPv4(10, 0, 0, byte(i)), Port: 4000}}
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		c, ok := l.admit(peers[i&255])
		if !ok {
			b.Fatal("refused")
		}
		c.Close()
		i++
	}
}

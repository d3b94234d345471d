// Package connlimit caps the connections a server holds open: a net.Listener
// that refuses connections past a global cap and past a per-address cap,
// counts what it refused, and backs off when accepting fails (out of file
// descriptors) instead of spinning.
//
// Invariant: every connection Accept returns is counted once, in the total
// and under its address, from Accept until its first Close; the counts never
// include a refused connection. Hijacked connections (streams) are the same
// net.Conn and stay counted until the stream closes them.
package connlimit

import (
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Options configure a Listener. A zero cap is no cap.
type Options struct {
	// Max is the most connections open at once.
	Max int
	// PerAddr is the most connections open at once from one client address
	// (IPv6 clients are counted by their /64).
	PerAddr int
	// Exempt, when set, names peers the per-address cap does not apply to
	// (trusted proxies, which carry many clients).
	Exempt func(netip.Addr) bool
	// Log reports accept failures; nil is slog.Default.
	Log *slog.Logger
	// sleep waits between failed accepts (tests replace it).
	sleep func(time.Duration)
}

// Stats are a Listener's counters.
type Stats struct {
	Open           int64  // connections open now
	RefusedMax     uint64 // refused because Max were open
	RefusedPerAddr uint64 // refused because PerAddr were open from the address
	AcceptErrors   uint64 // failed accepts (each followed by a back-off)
}

// Listener is a net.Listener with connection caps.
type Listener struct {
	net.Listener
	opt Options

	mu     sync.Mutex
	byAddr map[netip.Addr]int

	open                      atomic.Int64
	refusedMax, refusedByAddr atomic.Uint64
	acceptErrors              atomic.Uint64
}

// Back-off after a failed accept: doubling from minBackoff to maxBackoff, as
// net/http does for temporary errors.
const (
	minBackoff = 5 * time.Millisecond
	maxBackoff = time.Second
)

// Wrap returns ln with the caps of opt.
func Wrap(ln net.Listener, opt Options) *Listener {
	if opt.Log == nil {
		opt.Log = slog.Default()
	}
	if opt.sleep == nil {
		opt.sleep = time.Sleep
	}
	return &Listener{Listener: ln, opt: opt, byAddr: map[netip.Addr]int{}}
}

// Stats returns the listener's counters.
func (l *Listener) Stats() Stats {
	return Stats{Open: l.open.Load(), RefusedMax: l.refusedMax.Load(),
		RefusedPerAddr: l.refusedByAddr.Load(), AcceptErrors: l.acceptErrors.Load()}
}

// Accept returns the next connection within the caps. A connection past a
// cap is answered with a short HTTP error and closed. A failed accept other
// than the listener's close is retried after a growing pause, so that
// running out of file descriptors does not spin a core; the pause resets
// once a connection is accepted.
func (l *Listener) Accept() (net.Conn, error) {
	var delay time.Duration
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil, err
			}
			l.acceptErrors.Add(1)
			delay = min(max(2*delay, minBackoff), maxBackoff)
			if delay == minBackoff || delay == maxBackoff { // once per run of failures, then once a second
				l.opt.Log.Warn("accept failed; backing off", "err", err, "pause", delay)
			}
			l.opt.sleep(delay)
			continue
		}
		delay = 0
		if conn, ok := l.admit(c); ok {
			return conn, nil
		}
	}
}

// admit counts c in, or refuses and closes it.
func (l *Listener) admit(c net.Conn) (net.Conn, bool) {
	key := addrKey(c.RemoteAddr())
	if n := l.open.Add(1); l.opt.Max > 0 && n > int64(l.opt.Max) {
		l.open.Add(-1)
		l.refusedMax.Add(1)
		refuse(c, "503 Service Unavailable", "too_many_connections", "the server has too many open connections; retry later")
		return nil, false
	}
	capped := l.opt.PerAddr > 0 && key.IsValid() && (l.opt.Exempt == nil || !l.opt.Exempt(key))
	if capped {
		l.mu.Lock()
		if l.byAddr[key] >= l.opt.PerAddr {
			l.mu.Unlock()
			l.open.Add(-1)
			l.refusedByAddr.Add(1)
			refuse(c, "429 Too Many Requests", "too_many_connections", "too many open connections from this address")
			return nil, false
		}
		l.byAddr[key]++
		l.mu.Unlock()
	} else {
		key = netip.Addr{}
	}
	return &conn{Conn: c, l: l, key: key}, true
}

// release counts a closed connection out.
func (l *Listener) release(key netip.Addr) {
	l.open.Add(-1)
	if !key.IsValid() {
		return
	}
	l.mu.Lock()
	if n := l.byAddr[key] - 1; n > 0 {
		l.byAddr[key] = n
	} else {
		delete(l.byAddr, key)
	}
	l.mu.Unlock()
}

// refuse answers a refused connection with an HTTP error and closes it. The
// answer is a few hundred bytes into a fresh socket's empty send buffer, so
// the write does not wait; the deadline only guards that.
func refuse(c net.Conn, status, code, msg string) {
	body := `{"error":{"code":"` + code + `","message":"` + msg + `"}}` + "\n"
	head := "HTTP/1.1 " + status + "\r\nContent-Type: application/json\r\nConnection: close\r\nRetry-After: 1\r\nContent-Length: " +
		strconv.Itoa(len(body)) + "\r\n\r\n"
	_ = c.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
	_, _ = c.Write([]byte(head + body))
	_ = c.Close()
}

// addrKey is the address a connection is counted under: the peer's IPv4
// address, or its IPv6 /64 (one host usually has a whole /64); the zero
// Addr for a peer that is not IP.
func addrKey(a net.Addr) netip.Addr {
	tcp, ok := a.(*net.TCPAddr)
	if !ok {
		return netip.Addr{}
	}
	ip := tcp.AddrPort().Addr().Unmap()
	if ip.Is6() {
		p, _ := ip.WithZone("").Prefix(64)
		return p.Addr()
	}
	return ip
}

// conn is an admitted connection: Close counts it out once.
type conn struct {
	net.Conn
	l      *Listener
	key    netip.Addr
	closed atomic.Bool
}

func (c *conn) Close() error {
	err := c.Conn.Close()
	if c.closed.CompareAndSwap(false, true) {
		c.l.release(c.key)
	}
	return err
}

// SyscallConn gives the socket underneath, which the WebSocket reader waits
// on (syscall.Conn).
func (c *conn) SyscallConn() (syscall.RawConn, error) {
	sc, ok := c.Conn.(syscall.Conn)
	if !ok {
		return nil, errors.New("connlimit: the connection has no socket")
	}
	return sc.SyscallConn()
}

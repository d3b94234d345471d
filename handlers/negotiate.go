package handlers

import (
	"context"
	"encoding/json"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"golang.org/x/time/rate"

	"github.com/notifyd/notifyd/handlers/realtime"
	"github.com/notifyd/notifyd/store"
)

// negotiateWindow is how long an observation counts: older ones are forgotten.
const negotiateWindow = 7 * 24 * time.Hour

// Client reports are rate-limited per user: a burst of reportBurst, then one
// every reportEvery. A client reports once per pass down the transport ladder.
const (
	reportEvery = 10 * time.Second
	reportBurst = 5
)

// A server observation of a (network, browser, transport, user) is written at
// most once per seenEvery; seenKeys bounds how many are remembered for that.
const (
	seenEvery = time.Hour
	seenKeys  = 100_000
)

// NegotiateStore is what the negotiator needs of Postgres (a *store.Store).
type NegotiateStore interface {
	ReportTransports(ctx context.Context, rs []store.TransportReport) error
	SawTransport(ctx context.Context, r store.TransportReport) error
	TransportUsers(ctx context.Context, network netip.Prefix, browser string, since time.Time) (map[string]store.TransportUsers, error)
	ForgetTransports(ctx context.Context, before time.Time) (int64, error)
}

// Negotiator learns which transports work for a network and browser family
// (GET and POST /v1/negotiate; PROTOCOL.md, Negotiate). Its strong signal is
// what the server saw: a session whose client acknowledged a notification
// reached hello and was delivered to over its transport (Delivered). Client
// reports are the weak one: they count only for transports the server saw no
// one use there, one vote per user, rate-limited per user.
type Negotiator struct {
	st       NegotiateStore
	trusted  []netip.Prefix
	log      *slog.Logger
	warnOnce sync.Once

	// seen holds the server observations written (seenKey → time.Time), read
	// on every ack without a lock; seenCount is about its size.
	seen      sync.Map
	seenCount atomic.Int64

	mu       sync.Mutex
	limits   map[string]*rate.Limiter // POST /v1/negotiate, by user
	forgotAt time.Time                // when observations past the window were last deleted
}

type seenKey struct {
	network   netip.Prefix
	browser   string
	transport realtime.Transport
	user      string
}

// NewNegotiator returns a negotiator keeping observations in st.
// X-Forwarded-For is believed only from a peer inside trusted.
func NewNegotiator(st NegotiateStore, trusted []netip.Prefix, log *slog.Logger) *Negotiator {
	if log == nil {
		log = slog.Default()
	}
	return &Negotiator{st: st, trusted: trusted, log: log, limits: map[string]*rate.Limiter{}}
}

// outcome is one transport a client tried, as it reports it.
type outcome struct {
	Transport realtime.Transport `json:"transport"`
	OK        bool               `json:"ok"`
	Reason    string             `json:"reason"`
}

// negotiateAnswer is GET /v1/negotiate's body.
type negotiateAnswer struct {
	Order          []realtime.Transport `json:"order"`
	Learned        bool                 `json:"learned"`
	Network        string               `json:"network"`
	Browser        string               `json:"browser"`
	PingIntervalMs int64                `json:"ping_interval_ms"`
	PingTimeoutMs  int64                `json:"ping_timeout_ms"`
}

// negotiate is GET /v1/negotiate: the transport order to try and the heartbeat
// settings, for an authenticated client.
func (a *API) negotiate(w http.ResponseWriter, r *http.Request) {
	if _, err := a.Auth.Client(r); err != nil {
		writeError(w, err)
		return
	}
	n := a.Negotiate
	network, browser := n.clientNetwork(r), BrowserFamily(r.UserAgent())
	cfg := a.Hub.Config()
	ans := negotiateAnswer{Order: realtime.Transports, Network: network.String(), Browser: browser,
		PingIntervalMs: cfg.PingInterval.Milliseconds(), PingTimeoutMs: cfg.PingTimeout.Milliseconds()}
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	users, err := n.st.TransportUsers(ctx, network, browser, time.Now().Add(-negotiateWindow))
	if err != nil {
		// The default order is always a valid answer; the client must not wait on the database.
		a.Log.Warn("negotiate: reading observations failed", "err", err)
	} else {
		ans.Order, ans.Learned = order(users)
	}
	writeJSON(w, http.StatusOK, ans)
}

// reportNegotiate is POST /v1/negotiate: one outcome, or an array of them.
func (a *API) reportNegotiate(w http.ResponseWriter, r *http.Request) {
	id, err := a.Auth.Client(r)
	if err != nil {
		writeError(w, err)
		return
	}
	body, err := readBody(w, r, 4<<10)
	if err != nil {
		writeError(w, err)
		return
	}
	outs, err := parseOutcomes(body)
	if err != nil {
		writeError(w, err)
		return
	}
	// Only well-formed reports take from the user's budget: a malformed one costs no database work.
	n := a.Negotiate
	if !n.allowReport(id.User, time.Now()) {
		w.Header().Set("Retry-After", strconv.Itoa(int(reportEvery/time.Second)))
		writeError(w, errorf(http.StatusTooManyRequests, "rate_limited", "too many transport reports from this user; retry later"))
		return
	}
	network, browser := n.clientNetwork(r), BrowserFamily(r.UserAgent())
	now := time.Now()
	reports := make([]store.TransportReport, len(outs))
	for i, o := range outs {
		reports[i] = store.TransportReport{Network: network, Browser: browser, Transport: string(o.Transport),
			User: id.User, OK: o.OK, Reason: o.Reason, At: now}
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), 3*time.Second)
	defer cancel()
	if err := n.st.ReportTransports(ctx, reports); err != nil {
		a.Log.Warn("negotiate: recording outcomes failed", "err", err)
		writeError(w, store.DBError("negotiate: record outcomes", err))
		return
	}
	n.forgetOld(ctx, now)
	w.WriteHeader(http.StatusNoContent)
}

// allowReport takes one report from user's budget. Limiters that are full
// again (their user idle) are dropped once there are many.
func (n *Negotiator) allowReport(user string, now time.Time) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	lim, ok := n.limits[user]
	if !ok {
		if len(n.limits) >= seenKeys {
			for u, l := range n.limits {
				if l.TokensAt(now) >= reportBurst {
					delete(n.limits, u)
				}
			}
		}
		lim = rate.NewLimiter(rate.Every(reportEvery), reportBurst)
		n.limits[user] = lim
	}
	return lim.AllowN(now, 1)
}

// forgetOld deletes observations past the window, at most once an hour.
func (n *Negotiator) forgetOld(ctx context.Context, now time.Time) {
	n.mu.Lock()
	due := now.Sub(n.forgotAt) >= time.Hour
	if due {
		n.forgotAt = now
	}
	n.mu.Unlock()
	if !due {
		return
	}
	if _, err := n.st.ForgetTransports(ctx, now.Add(-negotiateWindow)); err != nil {
		n.log.Warn("negotiate: forgetting old observations failed", "err", err)
	}
}

// Delivered records that the client of s acknowledged a notification on it:
// its transport reached hello and delivered, for its network and browser
// family. A (network, browser, transport, user) is written at most once per
// seenEvery, and the write waits at most a second: it runs on the session's
// message path. A session with no known network (NewNegotiator not in use
// when it opened) is not counted.
func (n *Negotiator) Delivered(s *realtime.Session) {
	if n == nil || !s.Network.IsValid() {
		return
	}
	k := seenKey{network: s.Network, browser: BrowserFamily(s.UserAgent), transport: s.Transport, user: s.User}
	now := time.Now()
	if at, ok := n.seen.Load(k); ok && now.Sub(at.(time.Time)) < seenEvery {
		return
	}
	if n.seenCount.Load() >= seenKeys {
		n.seen.Range(func(key, at any) bool {
			if now.Sub(at.(time.Time)) < seenEvery {
				return true
			}
			if _, deleted := n.seen.LoadAndDelete(key); deleted {
				n.seenCount.Add(-1)
			}
			return true
		})
	}
	if n.seenCount.Load() >= seenKeys {
		return // a full hour's worth of distinct keys: the rest wait for the next hour
	}
	// Stored before the write, also when it fails: a database outage is not retried per ack.
	if prev, loaded := n.seen.Swap(k, now); loaded && now.Sub(prev.(time.Time)) < seenEvery {
		return // another ack of the same key got here first
	} else if !loaded {
		n.seenCount.Add(1)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	err := n.st.SawTransport(ctx, store.TransportReport{Network: k.network, Browser: k.browser, Transport: string(k.transport), User: k.user, At: now})
	if err != nil {
		n.log.Warn("negotiate: recording a delivered session failed", "err", err)
	}
}

// parseOutcomes reads `{"transport","ok","reason"}` or an array of up to 8 of them.
func parseOutcomes(body []byte) ([]outcome, error) {
	bad := func(msg string) error { return errorf(http.StatusBadRequest, "bad_request", msg) }
	var outs []outcome
	trimmed := strings.TrimSpace(string(body))
	if strings.HasPrefix(trimmed, "[") {
		if err := json.Unmarshal(body, &outs); err != nil {
			return nil, bad("body must be an outcome or an array of outcomes")
		}
	} else {
		var o outcome
		if err := json.Unmarshal(body, &o); err != nil {
			return nil, bad("body must be an outcome or an array of outcomes")
		}
		outs = []outcome{o}
	}
	if len(outs) == 0 || len(outs) > 8 {
		return nil, bad("give 1 to 8 outcomes")
	}
	for i := range outs {
		if !outs[i].Transport.Valid() {
			return nil, bad("transport must be websocket, sse or longpoll")
		}
		outs[i].Reason = cutReason(outs[i].Reason)
	}
	return outs, nil
}

// cutReason is reason as valid UTF-8 without NULs (Postgres text takes neither
// a NUL nor a broken character), cut to at most 64 bytes at a character boundary.
func cutReason(reason string) string {
	reason = strings.ReplaceAll(strings.ToValidUTF8(reason, ""), "\x00", "")
	if len(reason) <= 64 {
		return reason
	}
	cut := 64
	for cut > 0 && !utf8.RuneStart(reason[cut]) {
		cut--
	}
	return reason[:cut]
}

// order answers the transports to try and whether anything is known of them.
// A transport the server saw a user deliver over worked; of the others, one
// whose users' latest reports are at least as often successes as failures
// (and some are) worked, one more often failures failed, and the rest are
// untried. Worked ones come first, then untried, then failed; the default
// order within each group. A report can only demote a transport no user was
// seen delivering over, and each user counts once.
func order(users map[string]store.TransportUsers) ([]realtime.Transport, bool) {
	const (
		worked = iota
		untried
		failed
	)
	groupOf := func(u store.TransportUsers) int {
		switch {
		case u.Seen > 0:
			return worked
		case u.Failed > u.Worked:
			return failed
		case u.Worked > 0:
			return worked
		}
		return untried
	}
	out := make([]realtime.Transport, 0, len(realtime.Transports))
	for _, g := range []int{worked, untried, failed} {
		for _, t := range realtime.Transports {
			if groupOf(users[string(t)]) == g {
				out = append(out, t)
			}
		}
	}
	return out, len(users) > 0
}

// sessionNetwork is the network a new session's client is counted in for
// negotiate; the zero Prefix when the negotiator is off.
func (a *API) sessionNetwork(r *http.Request) netip.Prefix {
	if a.Negotiate == nil {
		return netip.Prefix{}
	}
	return a.Negotiate.clientNetwork(r)
}

// clientNetwork is the network prefix of the client behind r: /24 for IPv4,
// /48 for IPv6. X-Forwarded-For is read right to left, skipping trusted
// proxies, only when the peer itself is a trusted proxy.
func (n *Negotiator) clientNetwork(r *http.Request) netip.Prefix {
	addr := peerAddr(r.RemoteAddr)
	if n.isTrusted(addr) {
		hops := strings.Split(strings.Join(r.Header.Values("X-Forwarded-For"), ","), ",")
		for i := len(hops) - 1; i >= 0; i-- {
			hop, err := netip.ParseAddr(strings.TrimSpace(hops[i]))
			if err != nil {
				break
			}
			addr = hop.Unmap()
			if !n.isTrusted(addr) {
				break
			}
		}
	}
	if len(n.trusted) == 0 && (addr.IsPrivate() || addr.IsLoopback()) {
		n.warnOnce.Do(func() {
			n.log.Warn("clients arrive from a private address and NOTIFY_TRUSTED_PROXIES is empty: "+
				"behind a proxy every client counts in the proxy's network for negotiate; list the proxies in NOTIFY_TRUSTED_PROXIES",
				"network", NetworkPrefix(addr).String())
		})
	}
	return NetworkPrefix(addr)
}

func (n *Negotiator) isTrusted(addr netip.Addr) bool {
	for _, p := range n.trusted {
		if p.Contains(addr) {
			return true
		}
	}
	return false
}

// peerAddr parses a RemoteAddr ("ip:port"); an unparsable one is the zero Addr.
func peerAddr(remote string) netip.Addr {
	host, _, err := net.SplitHostPort(remote)
	if err != nil {
		host = remote
	}
	addr, err := netip.ParseAddr(host)
	if err != nil {
		return netip.Addr{}
	}
	return addr.Unmap()
}

// NetworkPrefix is the network a client address is counted in: its /24 for
// IPv4, its /48 for IPv6, and 0.0.0.0/0 for an unknown address.
func NetworkPrefix(addr netip.Addr) netip.Prefix {
	bits := 24
	switch {
	case !addr.IsValid():
		return netip.PrefixFrom(netip.IPv4Unspecified(), 0)
	case addr.Is6():
		bits = 48
	}
	p, _ := addr.WithZone("").Prefix(bits)
	return p
}

// BrowserFamily names the browser behind a User-Agent: edge, opera, chrome
// (Chromium included), firefox, safari, or other.
func BrowserFamily(ua string) string {
	switch {
	case strings.Contains(ua, "Edg/") || strings.Contains(ua, "Edge/"):
		return "edge"
	case strings.Contains(ua, "OPR/"):
		return "opera"
	case strings.Contains(ua, "Firefox/"):
		return "firefox"
	case strings.Contains(ua, "Chrome/") || strings.Contains(ua, "Chromium/") || strings.Contains(ua, "CriOS/"):
		return "chrome"
	case strings.Contains(ua, "Safari/"):
		return "safari"
	}
	return "other"
}

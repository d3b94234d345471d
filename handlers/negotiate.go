package handlers

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/notifyd/notifyd/handlers/realtime"
	"github.com/notifyd/notifyd/store"
)

// negotiateWindow is how long a reported outcome counts: older ones are forgotten.
const negotiateWindow = 7 * 24 * time.Hour

// NegotiateDB is what the negotiator needs of Postgres (a *pgxpool.Pool).
type NegotiateDB interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

// Negotiator learns which transports work for a network and browser family
// (GET and POST /v1/negotiate; PROTOCOL.md, Negotiate).
type Negotiator struct {
	db      NegotiateDB
	trusted []netip.Prefix
}

// NewNegotiator returns a negotiator storing outcomes in db. X-Forwarded-For
// is believed only from a peer inside trusted.
func NewNegotiator(db NegotiateDB, trusted []netip.Prefix) *Negotiator {
	return &Negotiator{db: db, trusted: trusted}
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
	order, learned, err := n.order(ctx, network, browser)
	if err != nil {
		// The default order is always a valid answer; the client must not wait on the database.
		a.Log.Warn("negotiate: reading outcomes failed", "err", err)
	} else {
		ans.Order, ans.Learned = order, learned
	}
	writeJSON(w, http.StatusOK, ans)
}

// reportNegotiate is POST /v1/negotiate: one outcome, or an array of them.
func (a *API) reportNegotiate(w http.ResponseWriter, r *http.Request) {
	if _, err := a.Auth.Client(r); err != nil {
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
	n := a.Negotiate
	network, browser := n.clientNetwork(r), BrowserFamily(r.UserAgent())
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), 3*time.Second)
	defer cancel()
	if err := n.record(ctx, network, browser, outs, time.Now()); err != nil {
		a.Log.Warn("negotiate: recording outcomes failed", "err", err)
		writeError(w, store.DBError("negotiate: record outcomes", err))
		return
	}
	w.WriteHeader(http.StatusNoContent)
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
		if len(outs[i].Reason) > 64 {
			outs[i].Reason = outs[i].Reason[:64]
		}
	}
	return outs, nil
}

// record adds the outcomes to their (network, browser, transport) rows.
func (n *Negotiator) record(ctx context.Context, network netip.Prefix, browser string, outs []outcome, now time.Time) error {
	for _, o := range outs {
		var ok, failed int
		var okAt, failedAt *time.Time
		if o.OK {
			ok, okAt = 1, &now
		} else {
			failed, failedAt = 1, &now
		}
		_, err := n.db.Exec(ctx, `
			INSERT INTO transport_outcomes AS t
				(network, browser, transport, successes, failures, last_success_at, last_failure_at, last_reason)
			VALUES ($1, $2, $3, $4, $5, $6, $7, NULLIF($8, ''))
			ON CONFLICT (network, browser, transport) DO UPDATE SET
				successes       = t.successes + EXCLUDED.successes,
				failures        = t.failures + EXCLUDED.failures,
				last_success_at = greatest(t.last_success_at, EXCLUDED.last_success_at),
				last_failure_at = greatest(t.last_failure_at, EXCLUDED.last_failure_at),
				last_reason     = coalesce(EXCLUDED.last_reason, t.last_reason)`,
			network, browser, string(o.Transport), ok, failed, okAt, failedAt, o.Reason)
		if err != nil {
			return fmt.Errorf("record %s outcome: %w", o.Transport, err)
		}
	}
	return nil
}

// order answers the transports to try: those whose latest outcome in the
// window was a success, then those not tried, then those whose latest outcome
// was a failure; the default order within each group. learned is false when
// nothing is known for this network and browser.
func (n *Negotiator) order(ctx context.Context, network netip.Prefix, browser string) ([]realtime.Transport, bool, error) {
	rows, err := n.db.Query(ctx, `
		SELECT transport, last_success_at, last_failure_at
		FROM transport_outcomes
		WHERE network = $1 AND browser = $2
		  AND greatest(last_success_at, last_failure_at) > $3`,
		network, browser, time.Now().Add(-negotiateWindow))
	if err != nil {
		return nil, false, fmt.Errorf("read outcomes: %w", err)
	}
	const (
		worked = iota
		untried
		failed
	)
	group := map[realtime.Transport]int{}
	for rows.Next() {
		var tr string
		var okAt, failedAt *time.Time
		if err := rows.Scan(&tr, &okAt, &failedAt); err != nil {
			rows.Close()
			return nil, false, fmt.Errorf("read outcomes: %w", err)
		}
		if okAt != nil && (failedAt == nil || !okAt.Before(*failedAt)) {
			group[realtime.Transport(tr)] = worked
		} else {
			group[realtime.Transport(tr)] = failed
		}
	}
	if err := rows.Err(); err != nil {
		return nil, false, fmt.Errorf("read outcomes: %w", err)
	}
	order := make([]realtime.Transport, 0, len(realtime.Transports))
	for _, g := range []int{worked, untried, failed} {
		for _, t := range realtime.Transports {
			got, known := group[t]
			if !known {
				got = untried
			}
			if got == g {
				order = append(order, t)
			}
		}
	}
	return order, len(group) > 0, nil
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

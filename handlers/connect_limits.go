package handlers

import (
	"math"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/notifyd/notifyd/handlers/ratelimit"
)

// ConnectLimits rate-limit the sessions a user and a client address open,
// on every transport (a long-poll session counts once, not per poll). A
// refused connect is answered 429 too_many_connects with Retry-After, before
// any WebSocket upgrade.
type ConnectLimits struct {
	perUser, perAddr *ratelimit.Keyed
	trusted          []netip.Prefix
}

// NewConnectLimits returns limits of perUser and perAddr (a zero Limit is
// none). X-Forwarded-For names the client only when the peer is inside
// trusted.
func NewConnectLimits(perUser, perAddr ratelimit.Limit, trusted []netip.Prefix) *ConnectLimits {
	return &ConnectLimits{perUser: ratelimit.New(perUser, 0), perAddr: ratelimit.New(perAddr, 0), trusted: trusted}
}

// Refused counts the connects refused by each limit.
func (c *ConnectLimits) Refused() (byUser, byAddr uint64) {
	if c == nil {
		return 0, 0
	}
	return c.perUser.Refused(), c.perAddr.Refused()
}

// allow takes a connect of user from r's client, or answers why not.
func (c *ConnectLimits) allow(r *http.Request, user string) error {
	if c == nil {
		return nil
	}
	if ok, after := c.perAddr.Allow(c.clientKey(r)); !ok {
		return tooManyConnects("too many connects from this address", after)
	}
	if ok, after := c.perUser.Allow(user); !ok {
		return tooManyConnects("too many connects of this user", after)
	}
	return nil
}

func tooManyConnects(msg string, after time.Duration) *Error {
	e := errorf(http.StatusTooManyRequests, "too_many_connects", msg+"; retry after "+strconv.Itoa(retrySeconds(after))+"s")
	e.RetryAfter = after
	return e
}

// retrySeconds is d in whole seconds for Retry-After, rounded up, at least 1.
func retrySeconds(d time.Duration) int {
	return max(1, int(math.Ceil(min(d, 24*time.Hour).Seconds())))
}

// clientKey is the client address r is counted under: the peer's address,
// or behind a trusted proxy the nearest untrusted X-Forwarded-For hop;
// IPv6 clients by their /64.
func (c *ConnectLimits) clientKey(r *http.Request) string {
	addr := peerAddr(r.RemoteAddr)
	if c.isTrusted(addr) {
		hops := strings.Split(strings.Join(r.Header.Values("X-Forwarded-For"), ","), ",")
		for i := len(hops) - 1; i >= 0; i-- {
			hop, err := netip.ParseAddr(strings.TrimSpace(hops[i]))
			if err != nil {
				break
			}
			if addr = hop.Unmap(); !c.isTrusted(addr) {
				break
			}
		}
	}
	if addr.Is6() {
		p, _ := addr.WithZone("").Prefix(64)
		return p.String()
	}
	return addr.String()
}

func (c *ConnectLimits) isTrusted(addr netip.Addr) bool {
	for _, p := range c.trusted {
		if p.Contains(addr) {
			return true
		}
	}
	return false
}

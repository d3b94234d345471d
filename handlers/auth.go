package handlers

import (
	"crypto/subtle"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// userChars is what a user id may be made of: 1 to 128 of [A-Za-z0-9._:@-]
// (PROTOCOL.md, Identities).
var userChars = newCharset("._:@-")

// ValidUser reports whether u is a well-formed user id.
func ValidUser(u string) bool { return userChars.valid(u) }

// charset is a set of bytes that names (user ids, topics) may be made of.
// Checking a name against it is a table lookup per byte, cheaper than a regexp
// match for a check made twice per published notification; FuzzNames holds it
// to PROTOCOL.md's patterns.
type charset [256]bool

// newCharset is the ASCII letters and digits plus punct.
func newCharset(punct string) *charset {
	var c charset
	for b := range 256 {
		c[b] = 'a' <= b && b <= 'z' || 'A' <= b && b <= 'Z' || '0' <= b && b <= '9'
	}
	for i := range len(punct) {
		c[punct[i]] = true
	}
	return &c
}

// valid reports whether s is 1 to 128 bytes, all in c.
func (c *charset) valid(s string) bool {
	if len(s) == 0 || len(s) > 128 {
		return false
	}
	for i := range len(s) {
		if !c[s[i]] {
			return false
		}
	}
	return true
}

// Auth checks client tokens, the publisher API key and request origins.
type Auth struct {
	secret  []byte
	apiKey  []byte
	origins map[string]bool // allowed Origin values; empty means the server's own origin only
	parser  *jwt.Parser
	maxTTL  time.Duration // longest lifetime a client token may have; 0 is no cap
}

// NewAuth returns an Auth. origins are full origins such as
// "https://app.example.com"; "*" allows any.
func NewAuth(secret, apiKey string, origins []string) *Auth {
	a := &Auth{secret: []byte(secret), apiKey: []byte(apiKey), origins: map[string]bool{},
		parser: jwt.NewParser(jwt.WithValidMethods([]string{"HS256"}), jwt.WithExpirationRequired(), jwt.WithLeeway(5*time.Second))}
	for _, o := range origins {
		if o = strings.TrimRight(strings.TrimSpace(o), "/"); o != "" {
			a.origins[strings.ToLower(o)] = true
		}
	}
	return a
}

// WithMaxTokenTTL caps the lifetime of the client tokens a accepts: a token
// whose exp - iat (exp - now without iat) exceeds ttl is refused, so a leaked
// long-lived token cannot be used for months. 0 leaves lifetimes uncapped.
func (a *Auth) WithMaxTokenTTL(ttl time.Duration) *Auth {
	a.maxTTL = ttl
	return a
}

// Claims are what a client token says.
type Claims struct {
	Device string `json:"device,omitempty"`
	jwt.RegisteredClaims
}

// Identity is the authenticated client behind a request.
type Identity struct {
	User   string
	Device string
}

// NewToken signs a client token for user (dev mode and `notifyd token`); its
// lifetime is ttl, cut to the maximum lifetime a accepts.
func (a *Auth) NewToken(user, device string, ttl time.Duration) (string, error) {
	if a.maxTTL > 0 && ttl > a.maxTTL {
		ttl = a.maxTTL
	}
	c := Claims{Device: device, RegisteredClaims: jwt.RegisteredClaims{
		Subject: user, IssuedAt: jwt.NewNumericDate(time.Now()), ExpiresAt: jwt.NewNumericDate(time.Now().Add(ttl))}}
	tok, err := jwt.NewWithClaims(jwt.SigningMethodHS256, c).SignedString(a.secret)
	if err != nil {
		return "", fmt.Errorf("sign token: %w", err)
	}
	return tok, nil
}

// headerBearer returns the Authorization bearer credential of a request.
func headerBearer(r *http.Request) string {
	if h := r.Header.Get("Authorization"); len(h) > 7 && strings.EqualFold(h[:7], "bearer ") {
		return strings.TrimSpace(h[7:])
	}
	return ""
}

// clientBearer returns a client token: the Authorization bearer, or the token
// query parameter (browsers cannot set headers on WebSocket or EventSource).
// The API key is never read from the query (see Publisher).
func clientBearer(r *http.Request) string {
	if tok := headerBearer(r); tok != "" {
		return tok
	}
	return r.URL.Query().Get("token")
}

// Client authenticates a client token.
func (a *Auth) Client(r *http.Request) (Identity, error) {
	raw := clientBearer(r)
	if raw == "" {
		return Identity{}, errUnauthorized
	}
	var c Claims
	tok, err := a.parser.ParseWithClaims(raw, &c, func(*jwt.Token) (any, error) { return a.secret, nil })
	if err != nil {
		msg := "invalid token"
		if errors.Is(err, jwt.ErrTokenExpired) {
			msg = "token expired"
		} else if errors.Is(err, jwt.ErrTokenRequiredClaimMissing) {
			msg = "token lacks a required claim (exp)"
		}
		return Identity{}, errorf(http.StatusUnauthorized, "unauthorized", msg)
	}
	// RFC 7515 §4.1.11: a recipient must reject a token whose crit header names
	// extensions it does not understand; notifyd understands none.
	if _, ok := tok.Header["crit"]; ok {
		return Identity{}, errorf(http.StatusUnauthorized, "unauthorized", "token has a crit header notifyd does not understand")
	}
	if a.maxTTL > 0 {
		start := time.Now()
		if c.IssuedAt != nil {
			start = c.IssuedAt.Time
		}
		if c.ExpiresAt.Sub(start) > a.maxTTL {
			return Identity{}, errorf(http.StatusUnauthorized, "unauthorized", "token lifetime exceeds NOTIFY_MAX_TOKEN_TTL")
		}
	}
	if !ValidUser(c.Subject) {
		return Identity{}, errorf(http.StatusUnauthorized, "unauthorized", "token subject is not a valid user id")
	}
	if len(c.Device) > 128 {
		return Identity{}, errorf(http.StatusUnauthorized, "unauthorized", "token device is too long")
	}
	return Identity{User: c.Subject, Device: c.Device}, nil
}

// Publisher reports whether the request carries the API key. It is taken only
// from the Authorization header: a key in a query string ends up in proxy logs
// and browser history.
func (a *Auth) Publisher(r *http.Request) bool {
	raw := headerBearer(r)
	return raw != "" && len(a.apiKey) > 0 && subtle.ConstantTimeCompare([]byte(raw), a.apiKey) == 1
}

// PublisherOrUser allows the API key, or a client token whose user is user.
func (a *Auth) PublisherOrUser(r *http.Request, user string) error {
	if a.Publisher(r) {
		return nil
	}
	id, err := a.Client(r)
	if err != nil {
		return err
	}
	if id.User != user {
		return errForbidden
	}
	return nil
}

// originAllowed says whether a browser Origin may use the server. With no
// allow-list only the server's own pages may: Origin must name the Host the
// request was sent to, and that Host must be an IP address or localhost. A
// host name is not enough: a DNS-rebinding page at http://evil.example:8080,
// its name pointed at this server, sends Origin and Host of evil.example:8080
// alike; an address or localhost is a name no such page can have.
func (a *Auth) originAllowed(r *http.Request, origin string) bool {
	if a.origins["*"] || a.origins[strings.ToLower(origin)] {
		return true
	}
	if len(a.origins) > 0 {
		return false
	}
	u, err := url.Parse(origin)
	if err != nil || !strings.EqualFold(u.Host, r.Host) {
		return false
	}
	host := strings.ToLower(u.Hostname())
	if host == "localhost" {
		return true
	}
	_, err = netip.ParseAddr(host)
	return err == nil
}

// Origins is middleware that refuses requests from origins outside the
// allow-list with 403 (WebSocket upgrades included) and answers CORS for the
// allowed ones. A request without Origin is not from a browser and is judged
// by its credentials alone.
func (a *Auth) Origins(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		origin := r.Header.Get("Origin")
		if origin == "" {
			next.ServeHTTP(w, r)
			return
		}
		if !a.originAllowed(r, origin) {
			writeError(w, errorf(http.StatusForbidden, "origin_not_allowed", "origin is not allowed"))
			return
		}
		h := w.Header()
		h.Set("Access-Control-Allow-Origin", origin)
		h.Add("Vary", "Origin")
		if r.Method == http.MethodOptions && r.Header.Get("Access-Control-Request-Method") != "" {
			h.Set("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS")
			h.Set("Access-Control-Allow-Headers", "Authorization, Content-Type, Last-Event-ID")
			h.Set("Access-Control-Max-Age", "600")
			w.WriteHeader(http.StatusNoContent)
			return
		}
		next.ServeHTTP(w, r)
	})
}

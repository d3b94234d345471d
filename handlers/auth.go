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

// NewToken signs a client token for user (dev mode and `notifyd token`).
func (a *Auth) NewToken(user, device string, ttl time.Duration) (string, error) {
	c := Claims{Device: device, RegisteredClaims: jwt.RegisteredClaims{
		Subject: user, IssuedAt: jwt.NewNumericDate(time.Now()), ExpiresAt: jwt.NewNumericDate(time.Now().Add(ttl))}}
	tok, err := jwt.NewWithClaims(jwt.SigningMethodHS256, c).SignedString(a.secret)
	if err != nil {
		return "", fmt.Errorf("sign token: %w", err)
	}
	return tok, nil
}

// bearer returns the credential of a request: the Authorization bearer, or
// the token query parameter (browsers cannot set headers on WebSocket or
// EventSource).
func bearer(r *http.Request) string {
	if h := r.Header.Get("Authorization"); len(h) > 7 && strings.EqualFold(h[:7], "bearer ") {
		return strings.TrimSpace(h[7:])
	}
	return r.URL.Query().Get("token")
}

// Client authenticates a client token.
func (a *Auth) Client(r *http.Request) (Identity, error) {
	raw := bearer(r)
	if raw == "" {
		return Identity{}, errUnauthorized
	}
	var c Claims
	if _, err := a.parser.ParseWithClaims(raw, &c, func(*jwt.Token) (any, error) { return a.secret, nil }); err != nil {
		msg := "invalid token"
		if errors.Is(err, jwt.ErrTokenExpired) {
			msg = "token expired"
		} else if errors.Is(err, jwt.ErrTokenRequiredClaimMissing) {
			msg = "token lacks a required claim (exp)"
		}
		return Identity{}, errorf(http.StatusUnauthorized, "unauthorized", msg)
	}
	if !ValidUser(c.Subject) {
		return Identity{}, errorf(http.StatusUnauthorized, "unauthorized", "token subject is not a valid user id")
	}
	if len(c.Device) > 128 {
		return Identity{}, errorf(http.StatusUnauthorized, "unauthorized", "token device is too long")
	}
	return Identity{User: c.Subject, Device: c.Device}, nil
}

// Publisher reports whether the request carries the API key.
func (a *Auth) Publisher(r *http.Request) bool {
	raw := bearer(r)
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

package handlers

import (
	"net/http"
	"net/http/httptest"
	"regexp"
	"runtime"
	"strings"
	"testing"
	"time"
)

// tokenRequest is an Auth and a connect request carrying a token it signed.
func tokenRequest(b *testing.B) (*Auth, *http.Request) {
	a := NewAuth("secret-for-the-benchmark", "", nil)
	tok, err := a.NewToken("user-123", "phone", time.Hour)
	if err != nil {
		b.Fatal(err)
	}
	return a, httptest.NewRequest("GET", "/v1/ws?token="+tok, nil)
}

// BenchmarkAuthClient: authenticating one client token, as every connect does.
func BenchmarkAuthClient(b *testing.B) {
	a, r := tokenRequest(b)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := a.Client(r); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkAuthClientConnect: the same on a new goroutine per token, as a
// connection's handler does, while 10,000 goroutines wait on small stacks as
// idle connections' do. New goroutines then start with small stacks (the
// runtime starts them at the average stack in use), so on-demand counts the
// stack growth that parsing a token causes; grown-first grows the stack once
// with growStack before, as serveWS and serveSSE do.
func BenchmarkAuthClientConnect(b *testing.B) {
	a, r := tokenRequest(b)
	idle := make(chan struct{})
	defer close(idle)
	for range 10_000 {
		go func() { <-idle }()
	}
	runtime.GC()
	runtime.GC() // the second GC's start size reflects the idle goroutines
	for _, c := range []struct {
		name string
		grow bool
	}{{"on-demand", false}, {"grown-first", true}} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			errs := make(chan error)
			for b.Loop() {
				go func() {
					if c.grow {
						growStack()
					}
					_, err := a.Client(r)
					errs <- err
				}()
				if err := <-errs; err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// FuzzNames checks the user id and topic checks against the patterns
// PROTOCOL.md gives for them.
func FuzzNames(f *testing.F) {
	for _, s := range []string{"", "alice", "user-1@example.com", "a b", "order.shipped/eu:1",
		strings.Repeat("x", 128), strings.Repeat("x", 129), "é", "a\x00", "tab\t", "a/b@c"} {
		f.Add(s)
	}
	user := regexp.MustCompile(`^[A-Za-z0-9._:@-]{1,128}$`)
	topic := regexp.MustCompile(`^[A-Za-z0-9._:/-]{1,128}$`)
	f.Fuzz(func(t *testing.T, s string) {
		if got, want := ValidUser(s), user.MatchString(s); got != want {
			t.Errorf("ValidUser(%q) = %v, want %v", s, got, want)
		}
		if got, want := topicChars.valid(s), topic.MatchString(s); got != want {
			t.Errorf("topic %q valid = %v, want %v", s, got, want)
		}
	})
}

package main

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/notifyd/notifyd/handlers"
)

// idleH2Sessions is how many idle SSE sessions BenchmarkIdleSSEOverTLSMemory
// holds: over HTTP/2 they share two connections (the server allows 250
// streams on one).
const idleH2Sessions = 500

// Environment of the child process that holds the TLS sessions.
const (
	benchTLSClientEnv = "NOTIFYD_BENCH_TLS_CLIENT" // "h2" or "h1"
	benchTLSCAEnv     = "NOTIFYD_BENCH_TLS_CA"     // the server's certificate (PEM file)
)

// BenchmarkIdleSSEOverTLSMemory reports the server's heap and goroutine
// stacks per idle SSE session over TLS: on HTTP/2 (streams served through
// the SSE library, several on one connection) and, to compare, on
// HTTP/1.1 (the hijacked path, one TLS connection each). The clients run
// in a child process, so only the server is measured. Run with
// -benchtime=1x.
func BenchmarkIdleSSEOverTLSMemory(b *testing.B) {
	for _, proto := range []string{"h2", "h1"} {
		b.Run(proto, func(b *testing.B) {
			for range b.N {
				s := startTLSServer(b)
				m := measureIdleTLS(b, s, proto, idleH2Sessions)
				b.ReportMetric(m.heap+m.stack, "B/session")
				b.ReportMetric(m.heap, "heap-B/session")
				b.ReportMetric(m.stack, "stack-B/session")
				b.ReportMetric(m.goroutines, "goroutines/session")
			}
		})
	}
}

// measureIdleTLS opens n idle SSE sessions over proto from a child process
// and returns what each costs the server.
func measureIdleTLS(b *testing.B, s *tlsTestServer, proto string, n int) idleCost {
	b.Helper()
	ca := filepath.Join(b.TempDir(), "ca.pem")
	if err := os.WriteFile(ca, s.cert.certPEM, 0o600); err != nil {
		b.Fatal(err)
	}
	return measureIdleChild(b, "TestTLSBenchClient", n,
		[]string{benchTLSClientEnv + "=" + proto, benchTLSCAEnv + "=" + ca, benchURLEnv + "=" + s.URL, benchCountEnv + "=" + strconv.Itoa(n)},
		func() int64 { return s.statsNow(b).ByTransport["sse"] })
}

// TestTLSBenchClient is the child process of BenchmarkIdleSSEOverTLSMemory:
// it opens the sessions over HTTP/2 or HTTP/1.1, checks the protocol,
// prints "ready", and holds them until stdin closes.
func TestTLSBenchClient(t *testing.T) {
	proto := os.Getenv(benchTLSClientEnv)
	if proto == "" {
		t.Skip("only run as the benchmark's client process")
	}
	base := os.Getenv(benchURLEnv)
	n, err := strconv.Atoi(os.Getenv(benchCountEnv))
	if err != nil {
		t.Fatal(err)
	}
	pem, err := os.ReadFile(os.Getenv(benchTLSCAEnv))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		t.Fatal("no certificate in the CA file")
	}
	client := h2Client(pool)
	tr := client.Transport.(*http.Transport)
	if proto == "h1" {
		tr.ForceAttemptHTTP2 = false
		tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
		tr.MaxIdleConnsPerHost = n
	}
	// One request first: the protocol is the one asked for.
	r, err := client.Get(base + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	r.Body.Close()
	if want := map[string]int{"h2": 2, "h1": 1}[proto]; r.ProtoMajor != want {
		t.Fatalf("over %s, want %s", r.Proto, proto)
	}
	auth := handlers.NewAuth(testSecret, testAPIKey, nil)
	err = forEach(n, 32, func(i int) error {
		tok, err := auth.NewToken(fmt.Sprintf("idle-tls-%d", i), "bench", time.Hour)
		if err != nil {
			return err
		}
		return holdSession(client, base, "sse", tok)
	})
	if err != nil {
		t.Fatal(err)
	}
	fmt.Println("ready")
	_, _ = io.Copy(io.Discard, os.Stdin)
}

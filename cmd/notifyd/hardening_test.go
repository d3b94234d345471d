package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// rawRequest opens a TCP connection from local (an address of 127/8, or ""
// for any) to ts and writes head, a request without its body.
func rawRequest(t *testing.T, ts *testServer, local, head string) net.Conn {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second}
	if local != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(local)}
	}
	conn, err := d.Dial("tcp", ts.Addr())
	if err != nil {
		t.Fatalf("dial from %s: %v", local, err)
	}
	t.Cleanup(func() { conn.Close() })
	if head != "" {
		if _, err := conn.Write([]byte(head)); err != nil {
			t.Fatalf("write request: %v", err)
		}
	}
	return conn
}

// readUntilClosed reads conn until the server closes it and returns what it
// read; it fails the test when the server keeps it open past guard.
func readUntilClosed(t *testing.T, conn net.Conn, guard time.Duration) []byte {
	t.Helper()
	_ = conn.SetReadDeadline(time.Now().Add(guard))
	var got bytes.Buffer
	buf := make([]byte, 4096)
	for {
		n, err := conn.Read(buf)
		got.Write(buf[:n])
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatalf("the server kept the connection open for %s (read so far: %q)", guard, got.String())
			}
			return got.Bytes()
		}
	}
}

// A client that writes into its SSE stream is disconnected and its session
// ends, instead of the server reading its bytes one system call at a time.
func TestSSEClientWritingIsDisconnected(t *testing.T) {
	ts := startServer(t)
	conn := rawRequest(t, ts, "", fmt.Sprintf("GET /v1/sse?token=%s HTTP/1.1\r\nHost: x\r\n\r\n", ts.token(t, "writer")))
	br := bufio.NewReader(conn)
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	status, err := br.ReadString('\n')
	if err != nil || !strings.Contains(status, " 200 ") {
		t.Fatalf("SSE answer %q, %v; want 200", status, err)
	}
	waitFor(t, 10*time.Second, "the SSE session to be live", func() (bool, string) {
		n, _, _ := ts.hub.Tracker().Counts()
		return n == 1, fmt.Sprintf("%d sessions", n)
	})
	go func() {
		junk := bytes.Repeat([]byte("x"), 64<<10)
		for range 64 { // 4 MiB, unless the server hangs up first
			if _, err := conn.Write(junk); err != nil {
				return
			}
		}
	}()
	readUntilClosed(t, conn, 10*time.Second)
	waitFor(t, 10*time.Second, "the SSE session to end", func() (bool, string) {
		n, _, _ := ts.hub.Tracker().Counts()
		return n == 0, fmt.Sprintf("%d sessions", n)
	})
}

var _ = http.StatusOK

package handlers

import (
	"bytes"
	"net"
	"sync/atomic"
	"testing"
	"time"
)

// readCounter counts the reads made on a connection.
type readCounter struct {
	net.Conn
	reads atomic.Int64
}

func (c *readCounter) Read(b []byte) (int, error) {
	c.reads.Add(1)
	return c.Conn.Read(b)
}

// A client that writes into a stream it should only read is cut off after
// one read: onClose reports it gone and closes the connection, instead of
// reading what it sends a byte per system call.
func TestOnCloseEndsOnClientBytes(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	raw, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	server := &readCounter{Conn: raw}
	defer server.Close()

	gone := make(chan struct{})
	onClose(server, func() { close(gone) })
	junk := bytes.Repeat([]byte("x"), 1<<20)
	go func() { _, _ = client.Write(junk) }()
	select {
	case <-gone:
	case <-time.After(10 * time.Second):
		t.Fatalf("onClose did not report the client gone after it sent bytes (%d reads so far)", server.reads.Load())
	}
	if n := server.reads.Load(); n != 1 {
		t.Errorf("onClose read %d times; want 1 (it stops at the first bytes)", n)
	}
	// The server closed its end: the client's read ends.
	_ = client.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := client.Read(make([]byte, 1)); err == nil {
		t.Error("client read data; want its connection closed by the server")
	} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Error("the server did not close the connection")
	}
}

// A client that closes its end is reported gone.
func TestOnCloseReportsClientClose(t *testing.T) {
	a, b := net.Pipe()
	gone := make(chan struct{})
	onClose(a, func() { close(gone) })
	_ = b.Close()
	select {
	case <-gone:
	case <-time.After(10 * time.Second):
		t.Fatal("onClose did not report a closed client")
	}
}

package handlers

import (
	"bufio"
	"errors"
	"net"
	"net/http"
	"os"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"github.com/gorilla/websocket"

	"github.com/notifyd/notifyd/handlers/realtime"
)

// The idle WebSocket: what keeps an idle connection at one goroutine on its
// first 2 KiB of stack, a 320-byte read buffer and no write buffer. This file
// and frameWriter (writer.go) are that machinery; the invariant is stated
// here once.
//
// Reading. An idle connection's only goroutine waits in park, inside
// RawConn.Read, for the socket to become readable; readable peeks at it with
// a raw recv. A lone client ping park answers itself (answerPing), a lone
// empty pong it counts as a sign of life; neither calls into anything deep
// (no gorilla, no JSON, no time formatting: realtime.AppendPong). Anything
// else readLoop reads through gorilla, which grows the stack, and a stack is
// never shrunk while its goroutine waits that deep: so readLoop runs only
// while gorilla's read buffer holds data, then starts a fresh park goroutine
// and ends. park takes bytes off the socket only while that buffer is empty
// (readLoop parks only then; after the upgrade it is empty), so gorilla
// never sees part of a frame. (A control frame other than a lone empty pong
// leaves readLoop waiting inside gorilla for the next message.)
//
// Writing. One goroutine at a time writes data frames: the one that holds
// frameWriter.busy. That is a flush goroutine, started by kick when a frame
// is queued and ended when nothing is, or a goroutine that claimed the writer
// (park answering a ping, SSE's keep-alive) and that writes once and gives
// the claim back (unclaim, flushClaimed), leaving whatever was queued since
// to a flush goroutine. A claim that fails means a writer runs: the pong is
// queued behind the frames it writes. A write on a plain socket arms no
// write deadline unless the socket is full (sendAll). When the session ends,
// the holder of busy finishes the connection (frames left, bye, close) and
// keeps busy: nothing is written after bye. gorilla writes only control frames (the
// keep-alive ping, pongs to pings it reads, the close frame) through
// WriteControl. Every write, ours (net.Conn.Write, RawConn.Write) and
// gorilla's, holds the socket's write lock for its whole frame, so frames
// never interleave.
//
// gorilla/websocket internals this relies on (v1.5.3, which
// TestGorillaVersion holds go.mod to; TestGorillaInternals pins each):
// Upgrade reads through the hijacked bufio.Reader when
// Upgrader.ReadBufferSize is 0 and that reader is larger than 256 bytes; it
// reads a control frame whole from that buffer (Peek), so the buffer holds at
// least 139 bytes; with a WriteBufferPool the connection allocates no write
// buffer, and WriteControl never draws from the pool.

// upgrader keeps idle connections small: a small read buffer (wsReadBuffer,
// handed to it by wsResponse), no write buffer of its own (data frames are
// written by wsConn.write; gorilla writes only control frames, which need
// none) and no compression (../shared/LIBRARIES.md). The Origins
// middleware has already judged Origin.
var upgrader = websocket.Upgrader{
	WriteBufferSize:   1024,
	WriteBufferPool:   &sync.Pool{}, // so no buffer per connection; never drawn from
	CheckOrigin:       func(*http.Request) bool { return true },
	EnableCompression: false,
}

// wsReadBuffer is the size of a connection's read buffer: enough for the
// usual client message (a ping is 21 bytes on the wire, an ack of a few ids
// some 100) and for any control frame (at most 139 bytes, which gorilla
// reads whole from the buffer), and more than the 256 bytes below which
// gorilla would put a 4 KiB buffer of its own in its place. Longer messages
// are read through it in pieces.
const wsReadBuffer = 320

// wsResponse gives gorilla's Upgrade a read buffer of our own (gorilla reads
// through the hijacked bufio.Reader when Upgrader.ReadBufferSize is 0), so
// the reader can tell whether a frame is already buffered before it parks.
type wsResponse struct {
	http.ResponseWriter
	br *bufio.Reader
}

// Hijack takes the connection and puts a wsReadBuffer-sized reader in front
// of it. Bytes the client sent ahead of the handshake stay where gorilla
// finds and refuses them.
func (w *wsResponse) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	conn, brw, err := http.NewResponseController(w.ResponseWriter).Hijack()
	if err != nil || brw.Reader.Buffered() > 0 {
		return conn, brw, err
	}
	w.br = bufio.NewReaderSize(conn, wsReadBuffer)
	return conn, bufio.NewReadWriter(w.br, brw.Writer), nil
}

// wsPingFrame is how long a client's ping message is on the wire: a masked
// text frame (2 header bytes, a 4-byte mask) of pingMessage's 15 bytes.
// wsPongFrame is the client's answer to our empty ping frame: a masked,
// empty pong control frame.
const (
	wsPingFrame = 2 + 4 + 15
	wsPongFrame = 2 + 4
)

// What readable took off the socket (wsConn.took).
const (
	tookNothing byte = iota
	tookPing
	tookPong
)

// readable is park's RawConn.Read callback: false (wait) while the socket
// has nothing to read; true once it has data, has reached end of file or has
// failed. When all it holds is one ping message, or one empty pong frame (a
// frozen browser tab answering our ping frame), it takes that off the socket
// (took); anything else stays for readLoop.
func (c *wsConn) readable(fd uintptr) bool {
	var b [wsPingFrame + 1]byte
	n, errno := recvNow(fd, b[:], syscall.MSG_PEEK)
	if errno == syscall.EAGAIN {
		return false
	}
	if errno != 0 {
		return true
	}
	what := tookNothing
	switch {
	case n == wsPingFrame && isPingFrame(b[:n]):
		what = tookPing
	case n == wsPongFrame && b[0] == 0x8a && b[1] == 0x80: // FIN, pong; masked, empty
		what = tookPong
	default:
		return true
	}
	if m, errno := recvNow(fd, b[:n], 0); errno == 0 && m == n {
		c.took = what
	}
	return true
}

// recvNow and sendNow are recv and send that never block (MSG_DONTWAIT),
// made as raw system calls: on a path this short, the scheduler's work
// around a blocking call (handing the processor off, waking the system
// monitor, which then polls every 20 µs for a while) would cost more than the
// call. The sockets are non-blocking; a would-block comes back as EAGAIN.
func recvNow(fd uintptr, b []byte, flags int) (int, syscall.Errno) {
	n, _, errno := syscall.RawSyscall6(syscall.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)),
		uintptr(flags|syscall.MSG_DONTWAIT), 0, 0)
	return int(n), errno
}

func sendNow(fd uintptr, b []byte) (int, syscall.Errno) {
	n, _, errno := syscall.RawSyscall6(syscall.SYS_SENDTO, fd, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)),
		syscall.MSG_DONTWAIT|syscall.MSG_NOSIGNAL, 0, 0)
	return int(n), errno
}

// isPingFrame reports whether b is one final, masked text frame that holds
// exactly pingMessage (RFC 6455, section 5.2).
func isPingFrame(b []byte) bool {
	if b[0] != 0x81 || b[1] != 0x80|byte(len(pingMessage)) {
		return false
	}
	mask := b[2:6]
	for i, want := range pingMessage {
		if b[6+i]^mask[i%4] != want {
			return false
		}
	}
	return true
}

// park waits, on a shallow stack, until the client sends something or the
// socket closes. A lone ping it answers itself, a lone pong it counts as a
// sign of life, and it waits again: the usual traffic of an idle connection
// then costs no other goroutine and no deeper stack. Anything else it reads
// and handles through readLoop. It is an idle connection's only goroutine.
// Without a RawConn it reads in place.
func (c *wsConn) park() {
	for c.raw != nil {
		c.took = tookNothing
		if err := c.raw.Read(c.peek); err != nil {
			c.api.Hub.End(c.s, realtime.ReasonClientClose)
			return
		}
		switch c.took {
		case tookPing:
			c.heard()
			c.answerPing()
		case tookPong:
			c.heard()
		default:
			c.readLoop()
			return
		}
	}
	c.readLoop()
}

// answerPing answers a ping, from park (on its shallow stack) or readLoop:
// it writes the pong itself, as one raw send, when no other writer runs, and
// otherwise (or without a RawConn) queues it for that writer.
func (c *wsConn) answerPing() {
	if c.raw == nil || !c.w.claim() {
		c.s.Send(realtime.PongFrame(time.Now()))
		return
	}
	if len(c.s.Wake()) > 0 {
		// Frames queued before this ping go out first, then the pong.
		c.s.Send(realtime.PongFrame(time.Now()))
		c.w.flushClaimed()
		return
	}
	var pong, b [64]byte
	frame := appendTextFrame(b[:0], realtime.AppendPong(pong[:0], time.Now()))
	ok := c.sendAll(frame)
	c.w.unclaim()
	if !ok {
		c.api.Hub.End(c.s, realtime.ReasonClientClose)
	}
}

// sendAll writes b to the socket in raw sends, waiting for room (until the
// write deadline) when the socket is full, and holds the socket's write lock
// throughout, so no other frame gets between its parts. It writes park's
// pongs and wsConn.write's frames on a plain socket. The deadline is armed
// only when the write must wait: a write that the socket takes at once
// (nearly always) sets no timer, which costs an idle connection more than
// anything but the syscalls, with the stack it grows in park
// (BenchmarkWSWriteDeadline compares). A deadline that an earlier write left behind (gorilla's WriteControl arms one)
// and that has passed refuses the write before anything is sent; then it is
// armed and the write tried again. A write that armed one clears it once
// done, so that the next write finds none to refuse it.
func (c *wsConn) sendAll(b []byte) bool {
	failed, armed := false, false
	send := func(fd uintptr) bool {
		for len(b) > 0 {
			n, errno := sendNow(fd, b)
			if errno == syscall.EAGAIN {
				if !armed {
					c.w.armDeadline() // SetWriteDeadline does not take the write lock held here
					armed = true
				}
				return false
			}
			if errno != 0 {
				failed = true
				return true
			}
			b = b[n:]
		}
		return true
	}
	err := c.raw.Write(send)
	if !armed && errors.Is(err, os.ErrDeadlineExceeded) {
		c.w.armDeadline()
		armed = true // a wait in this try runs to the deadline just set
		err = c.raw.Write(send)
	}
	ok := err == nil && !failed
	if armed && ok {
		// Leave no deadline behind to pass and make the next pong arm one again.
		_ = c.w.deadline(time.Time{})
	}
	return ok
}

// pingMessage is the client ping as clients send it; it is answered without
// a JSON parse (the same answer handleMessages gives).
var pingMessage = []byte(`{"type":"ping"}`)

// readLoop reads and handles client messages until none is buffered, then
// parks the connection on a new goroutine, with a new, small stack, and
// ends: handling a message grows this one's. It ends the session when the
// connection fails.
func (c *wsConn) readLoop() {
	for {
		if !c.readOne() {
			return
		}
		if c.raw != nil && c.br.Buffered() == 0 {
			go c.park()
			return
		}
	}
}

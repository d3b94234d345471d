package handlers

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"net"
	"net/http"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"github.com/gorilla/websocket"

	"github.com/notifyd/notifyd/handlers/realtime"
)

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

// closeCodes maps why a session ended to its WebSocket close code.
var closeCodes = map[realtime.Reason]int{
	realtime.ReasonShutdown:     websocket.CloseServiceRestart,
	realtime.ReasonHeartbeat:    4000,
	realtime.ReasonReplaced:     4001,
	realtime.ReasonKicked:       4002,
	realtime.ReasonSlowConsumer: 4003,
	realtime.ReasonError:        websocket.CloseInternalServerErr,
	realtime.ReasonClientClose:  websocket.CloseNormalClosure,
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

// wsConn carries one session over a WebSocket. An idle connection costs one
// goroutine on a 2 KiB stack and nothing else: the handler returns once it
// runs, so net/http keeps nothing pinned; the writer runs only while the
// session has something to write (frameWriter); the keep-alive ping is a
// timer. The goroutine (park) waits for the socket to become readable and
// answers a lone ping itself. Anything else is read through gorilla
// (readLoop), which grows a stack past 2 KiB, and a stack never shrinks back
// while its goroutine waits this deep: so that goroutine ends once nothing is
// buffered, and a new one parks. (A control frame other than a lone empty
// pong leaves readLoop waiting inside gorilla for the next message.)
type wsConn struct {
	api  *API
	s    *realtime.Session
	conn *websocket.Conn
	br   *bufio.Reader      // gorilla's read buffer (wsResponse)
	raw  syscall.RawConn    // the socket, for park's wait; nil when it has none
	peek func(uintptr) bool // park's readiness check (c.readable)
	// took is what readable took off the socket for park to act on (a lone
	// ping or pong); only the goroutine in park uses it.
	took byte
	w    frameWriter
	// release tells Hub.Shutdown that this connection has said its bye.
	release func()
	ping    *time.Timer
}

// serveWS is GET /v1/ws: auth and limits are checked before the upgrade so a
// refused client gets an HTTP status with a JSON body.
func (a *API) serveWS(w http.ResponseWriter, r *http.Request) {
	growStack()
	cr, err := a.readConnect(r, "")
	if err != nil {
		writeError(w, err)
		return
	}
	if !websocket.IsWebSocketUpgrade(r) {
		writeError(w, errorf(http.StatusBadRequest, "not_websocket", "expected a WebSocket upgrade"))
		return
	}
	s, err := a.openSession(r, cr, realtime.WebSocket)
	if err != nil {
		writeError(w, err)
		return
	}
	wr := &wsResponse{ResponseWriter: w}
	conn, err := upgrader.Upgrade(wr, r, nil)
	if err != nil {
		// Upgrade has answered the client already.
		a.Hub.End(s, realtime.ReasonError)
		return
	}
	c := &wsConn{api: a, s: s, conn: conn, br: wr.br, release: a.Hub.Hold()}
	if sc, ok := conn.NetConn().(syscall.Conn); ok && c.br != nil {
		if raw, err := sc.SyscallConn(); err == nil {
			c.raw, c.peek = raw, c.readable
		}
	}
	c.w = frameWriter{s: s, hub: a.Hub, write: c.write, finish: c.finish, deadline: conn.NetConn().SetWriteDeadline}
	c.ping = time.AfterFunc(c.pingAfter(), c.pingTick)
	s.SetNotify(c.w.kick)
	c.w.kick() // hello was queued before the upgrade
	conn.SetReadLimit(a.Limits.MaxMessageBytes)
	conn.SetPongHandler(func(string) error {
		c.heard()
		return nil
	})
	go c.park()
	a.replay(s, cr.cursor)
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
	c.w.armDeadline()
	ok := c.sendAll(frame)
	c.w.unclaim()
	if !ok {
		c.api.Hub.End(c.s, realtime.ReasonClientClose)
	}
}

// sendAll writes b to the socket in raw sends, waiting for room (until the
// write deadline) when the socket is full, and holds the socket's write lock
// throughout, so no other frame gets between its parts.
func (c *wsConn) sendAll(b []byte) bool {
	failed := false
	err := c.raw.Write(func(fd uintptr) bool {
		for len(b) > 0 {
			n, errno := sendNow(fd, b)
			if errno == syscall.EAGAIN {
				return false
			}
			if errno != 0 {
				failed = true
				return true
			}
			b = b[n:]
		}
		return true
	})
	return err == nil && !failed
}

// heard is a sign of life from the client: a message or a pong. It moves the
// session's deadline and the keep-alive ping. The connection has no read
// deadline: the sweeper evicts a silent session, and its end closes the
// socket, which wakes park.
func (c *wsConn) heard() {
	c.api.Hub.Touch(c.s)
	c.ping.Reset(c.pingAfter())
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

// readOne reads and handles one message; false once the session has ended.
// Every message and every pong frame is a sign of life.
func (c *wsConn) readOne() bool {
	a, s := c.api, c.s
	typ, data, err := c.conn.ReadMessage()
	if err != nil {
		reason := realtime.ReasonClientClose
		if errors.Is(err, websocket.ErrReadLimit) {
			reason = realtime.ReasonError // gorilla has sent close 1009 already
		}
		a.Hub.End(s, reason)
		return false
	}
	c.heard()
	if typ != websocket.TextMessage {
		s.Send(realtime.ErrorFrame("bad_message", "messages are JSON text frames"))
		return true
	}
	if bytes.Equal(bytes.TrimSpace(data), pingMessage) {
		c.answerPing()
		return true
	}
	msgs, err := realtime.ParseClientMessages(data)
	if err != nil {
		s.Send(protocolErrorFrame(err))
		return true
	}
	for _, f := range a.handleMessages(context.Background(), s, msgs) {
		s.Send(f)
	}
	return true
}

// finish runs once, when the session has ended: the frames still queued and
// bye where the reason sends one, then the close frame and the close.
func (c *wsConn) finish() {
	defer c.release()
	defer c.conn.Close()
	c.ping.Stop()
	frames, ok := c.w.leftover()
	if ok && c.write(frames) {
		reason := c.s.Reason()
		code := closeCodes[reason]
		msg := websocket.FormatCloseMessage(code, string(reason))
		_ = c.conn.WriteControl(websocket.CloseMessage, msg, time.Now().Add(time.Second))
	}
}

// pingAfter is how long the connection may stay silent before it gets a
// keep-alive ping frame: one and a half ping intervals, or halfway from the
// interval to the ping timeout when that comes sooner (a short timeout), so
// that the pong can still arrive in time. Every sign of life from the client
// pushes the ping back (heard), so a client that pings on time never gets
// one and its timer never fires: its own ping and our pong already keep the
// connection busy through proxies, and the session alive. A client that
// falls silent (a frozen tab) is pinged inside the ping timeout, and its
// pong keeps it present.
func (c *wsConn) pingAfter() time.Duration {
	cfg := c.api.Hub.Config()
	return min(cfg.PingInterval*3/2, (cfg.PingInterval+cfg.PingTimeout)/2)
}

// pingTick sends the keep-alive ping frame after pingAfter of silence, and
// again every ping interval while the silence lasts.
func (c *wsConn) pingTick() {
	s, hub := c.s, c.api.Hub
	if chanClosed(s.Done()) {
		return
	}
	if since := time.Since(s.LastSeen()); since < hub.Config().PingInterval {
		c.ping.Reset(c.pingAfter() - since) // heard from as the timer fired
		return
	}
	if err := c.conn.WriteControl(websocket.PingMessage, nil, time.Now().Add(writeWait)); err != nil {
		hub.End(s, realtime.ReasonClientClose)
		return
	}
	c.ping.Reset(hub.Config().PingInterval)
}

// write sends frames, one text message each, in as few writes to the socket
// as wsWriteChunk allows (gorilla would make a write per message); false when
// the connection failed. Frames from the server are unmasked and never
// compressed, so each is a short header and the JSON. Every Write to the
// socket is whole (the socket's own lock), so these never interleave with
// the control frames gorilla writes (ping, pong, close).
func (c *wsConn) write(frames []realtime.Frame) bool {
	if len(frames) == 0 {
		return true
	}
	conn := c.conn.NetConn()
	c.w.armDeadline()
	bp := wsBuffers.Get().(*[]byte)
	b := (*bp)[:0]
	var err error
	for i, f := range frames {
		b = appendTextFrame(b, f.JSON)
		if len(b) >= wsWriteChunk || i == len(frames)-1 {
			if _, err = conn.Write(b); err != nil {
				break
			}
			b = b[:0]
		}
	}
	if cap(b) <= 2*wsWriteChunk { // one huge frame's buffer is not kept
		*bp = b
		wsBuffers.Put(bp)
	}
	if err != nil {
		return false // how much reached the client is unknown: nothing is recorded
	}
	c.api.Hub.Written(c.s, frames)
	return true
}

// wsWriteChunk bounds what one write assembles, so a long backlog (up to the
// session's queue limit) is not copied into one buffer whole.
const wsWriteChunk = 64 << 10

// wsBuffers hold the frames of one write while it is assembled; an idle
// connection holds none.
var wsBuffers = sync.Pool{New: func() any { b := make([]byte, 0, 2048); return &b }}

// appendTextFrame appends payload as one final, unmasked text frame
// (RFC 6455, section 5.2).
func appendTextFrame(b, payload []byte) []byte {
	b = append(b, 0x81) // FIN, opcode text
	switch n := len(payload); {
	case n < 126:
		b = append(b, byte(n))
	case n <= 0xFFFF:
		b = append(b, 126)
		b = binary.BigEndian.AppendUint16(b, uint16(n))
	default:
		b = append(b, 127)
		b = binary.BigEndian.AppendUint64(b, uint64(n))
	}
	return append(b, payload...)
}

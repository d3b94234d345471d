package handlers

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"net/http"
	"sync"
	"syscall"
	"time"

	"github.com/gorilla/websocket"

	"github.com/notifyd/notifyd/handlers/realtime"
)

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

// wsConn carries one session over a WebSocket. The handler returns once the
// connection runs, so net/http keeps nothing pinned; the keep-alive ping is a
// timer; reading (park, readLoop) and writing (frameWriter) follow the idle
// WebSocket's invariant (idlews.go).
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
	c := a.newWSConn(s, conn, wr.br)
	s.SetNotify(c.w.kick)
	c.w.kick() // hello was queued before the upgrade
	go c.park()
	a.replay(s, cr.cursor)
}

// newWSConn carries s over conn, whose read buffer is br (wsResponse's; nil
// when gorilla has its own, and then the connection reads in place, without
// park's raw wait). Its keep-alive ping timer runs; the caller starts the
// writer (SetNotify) and the reader (park).
func (a *API) newWSConn(s *realtime.Session, conn *websocket.Conn, br *bufio.Reader) *wsConn {
	c := &wsConn{api: a, s: s, conn: conn, br: br, release: a.Hub.Hold()}
	if sc, ok := conn.NetConn().(syscall.Conn); ok && c.br != nil {
		if raw, err := sc.SyscallConn(); err == nil {
			c.raw, c.peek = raw, c.readable
		}
	}
	c.w = frameWriter{s: s, hub: a.Hub, write: c.write, finish: c.finish, deadline: conn.NetConn().SetWriteDeadline}
	c.ping = time.AfterFunc(c.pingAfter(), c.pingTick)
	conn.SetReadLimit(a.Limits.MaxMessageBytes)
	conn.SetPongHandler(func(string) error {
		c.heard()
		return nil
	})
	return c
}

// heard is a sign of life from the client: a message or a pong. It moves the
// session's deadline and the keep-alive ping. The connection has no read
// deadline: the sweeper evicts a silent session, and its end closes the
// socket, which wakes park.
func (c *wsConn) heard() {
	c.api.Hub.Touch(c.s)
	c.ping.Reset(c.pingAfter())
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
// the control frames gorilla writes (ping, pong, close). Over a plain socket
// the writes are sendAll's, which arm the write deadline only when the socket
// is full and leave none behind; over TLS they go through the connection,
// under a deadline armed for each call.
func (c *wsConn) write(frames []realtime.Frame) bool {
	if len(frames) == 0 {
		return true
	}
	conn := c.conn.NetConn()
	if c.raw == nil {
		c.w.armDeadline()
	}
	bp := wsBuffers.Get().(*[]byte)
	b := (*bp)[:0]
	ok := true
	for i, f := range frames {
		b = appendTextFrame(b, f.JSON)
		if len(b) >= wsWriteChunk || i == len(frames)-1 {
			if c.raw != nil {
				ok = c.sendAll(b)
			} else {
				_, err := conn.Write(b)
				ok = err == nil
			}
			if !ok {
				break
			}
			b = b[:0]
		}
	}
	if cap(b) <= 2*wsWriteChunk { // one huge frame's buffer is not kept
		*bp = b
		wsBuffers.Put(bp)
	}
	if !ok {
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

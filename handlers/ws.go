package handlers

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"

	"github.com/notifyd/notifyd/handlers/realtime"
)

const wsWriteWait = 10 * time.Second

// upgrader keeps idle connections small: small buffers, a pooled write buffer
// (held only while a message is written) and no compression
// (../shared/LIBRARIES.md). The Origins middleware has already judged Origin.
var upgrader = websocket.Upgrader{
	ReadBufferSize:    512,
	WriteBufferSize:   1024,
	WriteBufferPool:   &sync.Pool{},
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

// wsConn carries one session over a WebSocket. An idle connection costs one
// goroutine, its reader; the handler returns once it runs, so net/http keeps
// nothing pinned per connection. The writer is started only when the session
// has something to write (flush), and the keep-alive ping is a timer, so an
// idle connection holds no writer goroutine and no stack for it: that is most
// of the memory of an idle session.
type wsConn struct {
	api  *API
	s    *realtime.Session
	conn *websocket.Conn
	// flushing is true while a flush goroutine runs (at most one does: it is
	// the connection's only writer of data frames).
	flushing atomic.Bool
	// release tells Hub.Shutdown that this connection has said its bye.
	release func()
	ping    *time.Timer
}

// serveWS is GET /v1/ws: auth and limits are checked before the upgrade so a
// refused client gets an HTTP status with a JSON body.
func (a *API) serveWS(w http.ResponseWriter, r *http.Request) {
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
	conn, err := upgrader.Upgrade(w, r, nil)
	if err != nil {
		// Upgrade has answered the client already.
		a.Hub.End(s, realtime.ReasonError)
		return
	}
	c := &wsConn{api: a, s: s, conn: conn, release: a.Hub.Hold()}
	c.ping = time.AfterFunc(a.Hub.Config().PingInterval, c.pingTick)
	s.SetNotify(c.kick)
	c.kick() // hello was queued before the upgrade
	go c.readLoop()
	a.replay(s, cr.cursor)
}

// pingMessage is the client ping as clients send it; it is answered without
// a JSON parse (the same answer handleMessages gives).
var pingMessage = []byte(`{"type":"ping"}`)

// readLoop reads client messages until the connection fails. Every message
// and every pong frame is a sign of life.
func (c *wsConn) readLoop() {
	a, s := c.api, c.s
	c.conn.SetReadLimit(a.Limits.MaxMessageBytes)
	// The sweeper evicts on time; the read deadline only backs it up.
	backstop := a.Hub.Config().PingTimeout + 5*time.Second
	_ = c.conn.SetReadDeadline(time.Now().Add(backstop))
	c.conn.SetPongHandler(func(string) error {
		a.Hub.Touch(s)
		return c.conn.SetReadDeadline(time.Now().Add(backstop))
	})
	ctx := context.Background()
	for {
		typ, data, err := c.conn.ReadMessage()
		if err != nil {
			reason := realtime.ReasonClientClose
			if errors.Is(err, websocket.ErrReadLimit) {
				reason = realtime.ReasonError // gorilla has sent close 1009 already
			}
			a.Hub.End(s, reason)
			return
		}
		a.Hub.Touch(s)
		_ = c.conn.SetReadDeadline(time.Now().Add(backstop))
		if typ != websocket.TextMessage {
			s.Send(realtime.ErrorFrame("bad_message", "messages are JSON text frames"))
			continue
		}
		if bytes.Equal(bytes.TrimSpace(data), pingMessage) {
			// The message an idle client sends. A shallow path keeps this
			// goroutine's stack (which it keeps while idle) small, and the
			// pong is written from here when no flush runs: starting a
			// writer goroutine for it would wake a second thread per ping.
			inline := c.flushing.CompareAndSwap(false, true)
			s.Send(realtime.PongFrame(time.Now()))
			if inline {
				c.flushInline()
			}
			continue
		}
		msgs, err := realtime.ParseClientMessages(data)
		if err != nil {
			s.Send(protocolErrorFrame(err))
			continue
		}
		for _, f := range a.handleMessages(ctx, s, msgs) {
			s.Send(f)
		}
	}
}

// kick starts a flush unless one runs. The session calls it (with its lock
// held) whenever a frame is queued and when it ends.
func (c *wsConn) kick() {
	if c.flushing.CompareAndSwap(false, true) {
		go c.flush()
	}
}

// flush writes what is queued until nothing is, then ends; when the session
// has ended it says bye and closes the connection (finish).
func (c *wsConn) flush() {
	s, hub := c.s, c.api.Hub
	for {
		select {
		case <-s.Done():
			c.finish()
			return // flushing stays true: no writer runs after the close
		case <-s.Wake():
			if !c.write(s.Take()) {
				hub.End(s, realtime.ReasonClientClose)
			}
			continue
		default:
		}
		c.flushing.Store(false)
		// A frame queued (or an end) after the select above may have found
		// flushing still true and started nothing; its Wake or Done signal is
		// left behind, so look once more before leaving.
		if len(s.Wake()) == 0 && !chanClosed(s.Done()) {
			return
		}
		if !c.flushing.CompareAndSwap(false, true) {
			return // a kick started another flush
		}
	}
}

// flushInline writes what is queued, once, from the calling goroutine (the
// reader answering a ping), which has set flushing. Whatever is queued after
// that, and the end of the session, are left to a flush goroutine, so the
// reader is never kept from reading for long.
func (c *wsConn) flushInline() {
	s := c.s
	if !chanClosed(s.Done()) {
		select {
		case <-s.Wake(): // taken with the frames below
		default:
		}
		if !c.write(s.Take()) {
			c.api.Hub.End(s, realtime.ReasonClientClose)
		}
	}
	c.flushing.Store(false)
	if len(s.Wake()) > 0 || chanClosed(s.Done()) {
		c.kick()
	}
}

func chanClosed(done <-chan struct{}) bool {
	select {
	case <-done:
		return true
	default:
		return false
	}
}

// finish runs once, when the session has ended: the frames still queued and
// bye where the reason sends one, then the close frame and the close.
func (c *wsConn) finish() {
	s, hub := c.s, c.api.Hub
	defer c.release()
	defer c.conn.Close()
	c.ping.Stop()
	reason := s.Reason()
	if reason == realtime.ReasonClientClose {
		return
	}
	frames := s.Take()
	if reason.SendsBye() {
		frames = append(frames, hub.Bye(reason))
	}
	if c.write(frames) {
		code := closeCodes[reason]
		msg := websocket.FormatCloseMessage(code, string(reason))
		_ = c.conn.WriteControl(websocket.CloseMessage, msg, time.Now().Add(time.Second))
	}
}

// pingTick sends the keep-alive ping frame, every ping interval, unless the
// client was heard from within the last interval: its own ping and our pong
// already kept the connection busy through proxies, and the session alive.
// A client that falls silent (a frozen tab) is pinged within two intervals of
// its last sign of life, well inside the ping timeout, and its pong keeps it
// present. Skipping halves the packets of an idle server whose clients ping.
func (c *wsConn) pingTick() {
	s, hub := c.s, c.api.Hub
	if chanClosed(s.Done()) {
		return
	}
	interval := hub.Config().PingInterval
	if time.Since(s.LastSeen()) >= interval {
		if err := c.conn.WriteControl(websocket.PingMessage, nil, time.Now().Add(wsWriteWait)); err != nil {
			hub.End(s, realtime.ReasonClientClose)
			return
		}
	}
	c.ping.Reset(interval)
}

// write sends frames, one text message each; false when the connection failed.
func (c *wsConn) write(frames []realtime.Frame) bool {
	if len(frames) == 0 {
		return true
	}
	_ = c.conn.SetWriteDeadline(time.Now().Add(wsWriteWait))
	for i, f := range frames {
		if err := c.conn.WriteMessage(websocket.TextMessage, f.JSON); err != nil {
			c.api.Hub.Written(c.s, frames[:i])
			return false
		}
	}
	c.api.Hub.Written(c.s, frames)
	return true
}

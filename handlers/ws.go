package handlers

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"sync"
	"time"

	"github.com/gorilla/websocket"

	"github.com/notifyd/notifyd/handlers/realtime"
)

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
// nothing pinned per connection. The writer runs only while the session has
// something to write (frameWriter), and the keep-alive ping is a timer.
type wsConn struct {
	api  *API
	s    *realtime.Session
	conn *websocket.Conn
	w    frameWriter
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
	c.w = frameWriter{s: s, hub: a.Hub, write: c.write, finish: c.finish,
		cut: func() { _ = conn.NetConn().SetWriteDeadline(time.Now().Add(byeWait)) }}
	c.ping = time.AfterFunc(a.Hub.Config().PingInterval, c.pingTick)
	s.SetNotify(c.w.kick)
	c.w.kick() // hello was queued before the upgrade
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
			// pong is written from here when no flush runs (see claim).
			claimed := c.w.claim()
			s.Send(realtime.PongFrame(time.Now()))
			if claimed {
				c.w.flushClaimed()
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
		if err := c.conn.WriteControl(websocket.PingMessage, nil, time.Now().Add(writeWait)); err != nil {
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
	c.w.armDeadline(c.conn.SetWriteDeadline)
	for i, f := range frames {
		if err := c.conn.WriteMessage(websocket.TextMessage, f.JSON); err != nil {
			c.api.Hub.Written(c.s, frames[:i])
			return false
		}
	}
	c.api.Hub.Written(c.s, frames)
	return true
}

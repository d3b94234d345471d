package handlers

import (
	"context"
	"errors"
	"net/http"
	"sync"
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

// wsConn carries one session over a WebSocket. Its two goroutines are the
// only reader and the only writer of the connection; the handler returns once
// they run, so net/http keeps nothing pinned per connection.
type wsConn struct {
	api  *API
	s    *realtime.Session
	conn *websocket.Conn
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
	c := &wsConn{api: a, s: s, conn: conn}
	a.Hub.Go(c.writeLoop)
	go c.readLoop()
	a.replay(s, cr.cursor)
}

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

// writeLoop is the connection's only writer: queued frames, keep-alive pings,
// and at the end bye and the close frame.
func (c *wsConn) writeLoop() {
	s, hub := c.s, c.api.Hub
	ping := time.NewTicker(hub.Config().PingInterval)
	defer func() {
		ping.Stop()
		_ = c.conn.Close()
	}()
	for {
		select {
		case <-s.Wake():
			if !c.write(s.Take()) {
				hub.End(s, realtime.ReasonClientClose)
			}
		case <-ping.C:
			if err := c.conn.WriteControl(websocket.PingMessage, nil, time.Now().Add(wsWriteWait)); err != nil {
				hub.End(s, realtime.ReasonClientClose)
			}
		case <-s.Done():
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
			return
		}
	}
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

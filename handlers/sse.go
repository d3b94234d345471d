package handlers

import (
	"errors"
	"net"
	"net/http"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/notifyd/notifyd/handlers/realtime"
)

// sseKeepAlive is the longest an idle stream goes without a write (a comment
// line when nothing else goes out); at most the ping interval.
const sseKeepAlive = 15 * time.Second

// sseComment keeps proxies from closing an idle stream.
var sseComment = []byte(": ka\n\n")

// sseConn carries one session as an event stream on a hijacked HTTP/1.1
// connection (hijack.go): an idle stream costs one goroutine, which reads
// only to learn that the client went away, as a WebSocket does. Frames are
// written by a frameWriter, every batch of them in one write. The response
// has no length and no chunking and says Connection: close: it ends when the
// connection closes, after bye.
type sseConn struct {
	api     *API
	s       *realtime.Session
	conn    net.Conn
	w       frameWriter
	release func() // tells Hub.Shutdown that bye has been written
	every   time.Duration
	ka      *time.Timer
	// lastWrite is when anything last went out (unix nanoseconds).
	lastWrite atomic.Int64

	// Owned by the writer (frameWriter's single writer at a time).
	lastID    int64 // highest seq written: the id of every event
	sentRetry bool
}

// serveSSE is GET /v1/sse. Auth, cursor and limits are checked before the
// stream starts, so a refused client gets an HTTP status with a JSON body.
// Last-Event-ID, which the browser sends on reconnect, is the cursor.
func (a *API) serveSSE(w http.ResponseWriter, r *http.Request) {
	growStack()
	cr, err := a.readConnect(r, r.Header.Get("Last-Event-ID"))
	if err != nil {
		writeError(w, err)
		return
	}
	s, err := a.openSession(r, cr, realtime.SSE)
	if err != nil {
		writeError(w, err)
		return
	}
	head := responseHead(w.Header(), map[string]string{
		"Content-Type":      "text/event-stream",
		"Cache-Control":     "no-cache, no-transform",
		"X-Accel-Buffering": "no", // nginx: do not buffer this response
	})
	conn, err := hijack(w)
	if _, flushes := w.(http.Flusher); flushes && errors.Is(err, http.ErrNotSupported) {
		// An HTTP/2 stream cannot be taken over: the SSE library serves it.
		a.sseStreams.serve(w, r, s, cr.cursor)
		return
	}
	if err != nil {
		a.Hub.End(s, realtime.ReasonError)
		writeError(w, errorf(http.StatusHTTPVersionNotSupported, "http1_required", "event streams are served over HTTP/1.1"))
		return
	}
	_ = conn.SetWriteDeadline(time.Now().Add(writeWait))
	if _, err := conn.Write(head); err != nil {
		a.Hub.End(s, realtime.ReasonClientClose)
		conn.Close()
		return
	}
	c := &sseConn{api: a, s: s, conn: conn, release: a.Hub.Hold(), lastID: cr.cursor,
		every: min(sseKeepAlive, a.Hub.Config().PingInterval)}
	c.lastWrite.Store(time.Now().UnixNano())
	c.w = frameWriter{s: s, hub: a.Hub, write: c.write, finish: c.finish, deadline: conn.SetWriteDeadline}
	c.ka = time.AfterFunc(c.every, c.keepAlive)
	s.SetNotify(c.w.kick)
	c.w.kick() // hello was queued at registration
	onClose(conn, func() { a.Hub.End(s, realtime.ReasonClientClose) })
	a.replay(s, cr.cursor)
}

// write sends frames as events, all in one write; false when the connection failed.
func (c *sseConn) write(frames []realtime.Frame) bool {
	if len(frames) == 0 {
		return true
	}
	var b []byte
	for _, f := range frames {
		b = c.appendEvent(b, f)
	}
	if !c.send(b) {
		return false
	}
	c.api.Hub.Written(c.s, frames)
	return true
}

func (c *sseConn) send(b []byte) bool {
	c.w.armDeadline()
	if _, err := c.conn.Write(b); err != nil {
		return false
	}
	c.lastWrite.Store(time.Now().UnixNano())
	return true
}

// appendEvent appends f as one event. Every event carries the cursor as its
// id, since an event without one would reset the browser's Last-Event-ID;
// the first also tells the browser how long to wait before reconnecting.
// The data is one line: JSON needs no line breaks (a break in a string is
// escaped), so any in the payload are whitespace and become spaces.
func (c *sseConn) appendEvent(b []byte, f realtime.Frame) []byte {
	if f.Type == realtime.TypeNotification && f.Seq > c.lastID {
		c.lastID = f.Seq
	}
	if !c.sentRetry {
		b = append(b, "retry: "...)
		b = strconv.AppendInt(b, c.api.Hub.Config().ByeRetry.Milliseconds(), 10)
		b = append(b, '\n')
		c.sentRetry = true
	}
	b = append(b, "id: "...)
	b = strconv.AppendInt(b, c.lastID, 10)
	b = append(b, "\nevent: "...)
	b = append(b, f.Type...)
	b = append(b, "\ndata: "...)
	start := len(b)
	b = append(b, f.JSON...)
	for i := start; i < len(b); i++ {
		if b[i] == '\n' || b[i] == '\r' {
			b[i] = ' '
		}
	}
	return append(b, "\n\n"...)
}

// keepAlive writes a comment when the stream has been quiet for a whole
// interval, unless a writer is busy (it is writing anyway), and schedules
// itself for an interval after the last write.
func (c *sseConn) keepAlive() {
	s := c.s
	if chanClosed(s.Done()) {
		return
	}
	quiet := time.Since(time.Unix(0, c.lastWrite.Load()))
	if quiet >= c.every && c.w.claim() {
		if !c.send(sseComment) {
			c.api.Hub.End(s, realtime.ReasonClientClose)
		}
		c.w.flushClaimed()
		quiet = 0
	}
	c.ka.Reset(max(c.every-quiet, c.every/8))
}

// finish runs once, when the session has ended: the frames still queued and
// bye where the reason sends one, then the close, which ends the response.
func (c *sseConn) finish() {
	defer c.release()
	defer c.conn.Close()
	c.ka.Stop()
	if frames, ok := c.w.leftover(); ok {
		c.write(frames)
	}
}

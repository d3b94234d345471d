package handlers

import (
	"context"
	"net/http"
	"net/url"
	"strconv"
	"sync"
	"time"

	"github.com/r3labs/sse/v2"

	"github.com/notifyd/notifyd/handlers/realtime"
)

// SSE settings. The library writes each event and flushes it; the writer
// goroutine hands it at most sseWindow events that are not flushed yet, so the
// library's buffers never fill and a stalled client is caught by the write
// deadline instead of a blocked library goroutine.
const (
	// sseKeepAlive is the longest an idle stream goes without a comment line
	// (at most the ping interval).
	sseKeepAlive = 15 * time.Second
	// sseWriteWait bounds the writing of one event.
	sseWriteWait = 10 * time.Second
	// sseByeWait is how long the last events (bye) may take before the stream is cut.
	sseByeWait = time.Second
	// sseWindow is the most events handed to the library and not flushed yet.
	sseWindow = 32
)

// sseTransport serves GET /v1/sse with one r3labs/sse server. Every session
// gets its own stream, named by its ConnID, so nothing published for one
// session can reach another. Our session layer decides what is published;
// the library only writes it (../shared/LIBRARIES.md lists the defects this
// works around: AutoReplay off, fresh events, wait for OnSubscribe, remove a
// stream only once its subscriber left, cancel plus a write deadline to end).
type sseTransport struct {
	api *API
	srv *sse.Server

	mu    sync.Mutex
	conns map[string]*sseConn // by stream id, from CreateStream until OnUnsubscribe
}

// newSSE builds the SSE transport of a.
func (a *API) newSSE() *sseTransport {
	t := &sseTransport{api: a, conns: make(map[string]*sseConn)}
	srv := sse.New()
	srv.AutoReplay = false // its event log grows without bound; we replay from Postgres
	srv.AutoStream = false
	srv.EventTTL = 0
	srv.SplitData = true
	srv.EncodeBase64 = false
	srv.BufferSize = sseWindow + 8 // the window, a keep-alive, bye and the end marker
	srv.Headers = map[string]string{
		"Cache-Control":     "no-cache, no-transform",
		"X-Accel-Buffering": "no",
	}
	// Copied into each stream by CreateStream: set before any stream exists.
	srv.OnSubscribe = t.onSubscribe
	srv.OnUnsubscribe = t.onUnsubscribe
	t.srv = srv
	return t
}

// sseConn is one session carried by one SSE response. The writer goroutine
// (run) is the only publisher to its stream; the library's handler goroutine
// writes the events and reports each flush through sseWriter.
type sseConn struct {
	t      *sseTransport
	s      *realtime.Session
	ctx    context.Context
	cancel context.CancelFunc

	subscribed chan struct{} // closed by OnSubscribe: events published before it are dropped
	served     chan struct{} // closed once the library's ServeHTTP has returned
	flushed    chan struct{} // signalled (capacity one) after every flushed event

	// Written by the writer goroutine only.
	lastID    int64 // highest seq published: the id of every event
	sentRetry bool

	mu       sync.Mutex
	w        http.ResponseWriter // nil once ServeHTTP returned: deadlines may no longer be set
	cut      bool                // the stream is being cut: never move the deadline again
	inflight []realtime.Frame    // published, not flushed yet, oldest first (Type "" for a comment)
}

// serve is GET /v1/sse. Auth, cursor and limits are checked before any stream
// starts, so a refused client gets an HTTP status with a JSON body.
func (t *sseTransport) serve(w http.ResponseWriter, r *http.Request) {
	a := t.api
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
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	c := &sseConn{t: t, s: s, ctx: ctx, cancel: cancel, lastID: cr.cursor, w: w,
		subscribed: make(chan struct{}), served: make(chan struct{}), flushed: make(chan struct{}, 1)}
	id := s.ConnID
	t.mu.Lock()
	t.conns[id] = c
	t.mu.Unlock()
	t.srv.CreateStream(id)
	a.Hub.Go(func() { c.run(cr.cursor) })

	// The library picks the stream by ?stream= only and stops on a request
	// context that is ours to cancel. Last-Event-ID has been read above.
	req := r.Clone(ctx)
	req.URL.RawQuery = url.Values{"stream": {id}}.Encode()
	req.Header.Del("Last-Event-ID")
	sw := &sseWriter{ResponseWriter: w, c: c}
	t.srv.ServeHTTP(sw, req)

	c.mu.Lock()
	c.w = nil
	wasCut := c.cut
	c.mu.Unlock()
	if !wasCut {
		// The connection may serve another request: clear the event deadline.
		_ = http.NewResponseController(w).SetWriteDeadline(time.Time{})
	}
	if sw.status != http.StatusOK {
		// The library refused before subscribing: no OnUnsubscribe will come.
		t.remove(id)
	}
	close(c.served)
}

// onSubscribe runs (in its own goroutine) once the library registered the
// stream's subscriber: from now on published events reach it.
func (t *sseTransport) onSubscribe(id string, _ *sse.Subscriber) {
	t.mu.Lock()
	c := t.conns[id]
	t.mu.Unlock()
	if c != nil {
		close(c.subscribed)
	}
}

// onUnsubscribe runs once the subscriber has left the stream's goroutine:
// only now can the stream be removed without leaking that goroutine.
func (t *sseTransport) onUnsubscribe(id string, _ *sse.Subscriber) {
	t.remove(id)
}

func (t *sseTransport) remove(id string) {
	t.srv.RemoveStream(id)
	t.mu.Lock()
	delete(t.conns, id)
	t.mu.Unlock()
}

// run is the session's writer: hello, the replay, live frames and keep-alive
// comments, then bye and the end of the stream. It always cuts the stream
// before returning, so the library's goroutines end.
func (c *sseConn) run(cursor int64) {
	s, hub := c.s, c.t.api.Hub
	defer c.finish()
	select {
	case <-c.subscribed:
	case <-c.served:
		hub.End(s, realtime.ReasonError)
		return
	case <-c.ctx.Done():
		hub.End(s, realtime.ReasonClientClose)
		return
	}
	// hello goes out before the replay query runs.
	if reason, ok := c.publish(s.Take(), nil, s.Done()); !ok {
		hub.End(s, reason)
	} else {
		c.t.api.replay(s, cursor)
	}
	every := min(sseKeepAlive, hub.Config().PingInterval)
	keepAlive := time.NewTicker(every)
	defer keepAlive.Stop()
	for {
		select {
		case <-s.Wake():
			if reason, ok := c.publish(s.Take(), nil, s.Done()); !ok {
				hub.End(s, reason)
			}
		case <-keepAlive.C:
			if reason, ok := c.publishComment(); !ok {
				hub.End(s, reason)
			}
		case <-c.ctx.Done():
			hub.End(s, realtime.ReasonClientClose)
			return
		case <-c.served:
			hub.End(s, realtime.ReasonClientClose)
			return
		case <-s.Done():
			c.goodbye()
			return
		}
	}
}

// goodbye writes what is left and bye (where the reason has one), then ends
// the response cleanly; finish cuts it if that takes longer than sseByeWait.
func (c *sseConn) goodbye() {
	s, hub := c.s, c.t.api.Hub
	reason := s.Reason()
	if reason == realtime.ReasonClientClose {
		return
	}
	frames := s.Take()
	if reason.SendsBye() {
		frames = append(frames, hub.Bye(reason))
	}
	deadline := time.NewTimer(sseByeWait)
	defer deadline.Stop()
	if _, ok := c.publish(frames, deadline.C, nil); !ok {
		return
	}
	// An event without data or comment makes the library's handler return.
	if !c.reserve(deadline.C, nil) || !c.t.srv.TryPublish(c.s.ConnID, &sse.Event{}) {
		return
	}
	select {
	case <-c.served:
	case <-deadline.C:
	}
}

// finish cuts the stream: the request context is cancelled (the library then
// unsubscribes) and a write stuck on a client that stopped reading fails at
// once. It waits until the library's handler has returned.
func (c *sseConn) finish() {
	c.cancel()
	c.mu.Lock()
	c.cut = true
	if c.w != nil {
		_ = http.NewResponseController(c.w).SetWriteDeadline(time.Now())
	}
	c.mu.Unlock()
	select {
	case <-c.served:
	case <-time.After(sseWriteWait):
		c.t.api.Log.Warn("sse: stream did not end after it was cut", "session", c.s.ID)
	}
}

// publish hands frames to the library, one fresh event each (the library
// mutates events, so one event is never shared). It stops at the first frame
// that cannot go and says which reason ends the session then. stop and done,
// when not nil, end the wait for room in the window.
func (c *sseConn) publish(frames []realtime.Frame, stop <-chan time.Time, done <-chan struct{}) (realtime.Reason, bool) {
	for _, f := range frames {
		if !c.reserve(stop, done) {
			return realtime.ReasonClientClose, false
		}
		if f.Type == realtime.TypeNotification && f.Seq > c.lastID {
			c.lastID = f.Seq
		}
		// Every event carries the cursor: an empty id would reset the browser's lastEventId.
		ev := &sse.Event{Event: []byte(f.Type), Data: f.JSON, ID: strconv.AppendInt(nil, c.lastID, 10)}
		if !c.sentRetry {
			ev.Retry = strconv.AppendInt(nil, c.t.api.Hub.Config().ByeRetry.Milliseconds(), 10)
			c.sentRetry = true
		}
		if !c.push(f, ev) {
			return realtime.ReasonSlowConsumer, false
		}
	}
	return "", true
}

// publishComment writes a comment line that keeps proxies from closing an idle stream.
func (c *sseConn) publishComment() (realtime.Reason, bool) {
	if !c.reserve(nil, c.s.Done()) {
		return realtime.ReasonClientClose, false
	}
	if !c.push(realtime.Frame{}, &sse.Event{Comment: []byte("ka")}) {
		return realtime.ReasonSlowConsumer, false
	}
	return "", true
}

// push records f as in flight and publishes ev; false when the library's
// buffer refused it (it never should: the window is smaller).
func (c *sseConn) push(f realtime.Frame, ev *sse.Event) bool {
	c.mu.Lock()
	c.inflight = append(c.inflight, f)
	c.mu.Unlock()
	if c.t.srv.TryPublish(c.s.ConnID, ev) {
		return true
	}
	c.mu.Lock()
	c.inflight = c.inflight[:len(c.inflight)-1]
	c.mu.Unlock()
	return false
}

// reserve waits until fewer than sseWindow events are in flight. It gives up
// when the client is gone, or stop or done fires (the main loop passes the
// session's Done: an ended session is cut at once, see goodbye). A client
// that stops reading is caught by the write deadline of the event being
// written, or by its session's queue overflowing meanwhile.
func (c *sseConn) reserve(stop <-chan time.Time, done <-chan struct{}) bool {
	for {
		c.mu.Lock()
		n := len(c.inflight)
		c.mu.Unlock()
		if n < sseWindow {
			return true
		}
		select {
		case <-c.flushed:
		case <-c.ctx.Done():
			return false
		case <-c.served:
			return false
		case <-stop:
			return false
		case <-done:
			return false
		}
	}
}

// arm gives the event about to be written sseWriteWait to reach the client,
// unless the stream is being cut.
func (c *sseConn) arm() {
	c.mu.Lock()
	if !c.cut && c.w != nil {
		_ = http.NewResponseController(c.w).SetWriteDeadline(time.Now().Add(sseWriteWait))
	}
	c.mu.Unlock()
}

// onFlush runs in the library's handler goroutine after each event was
// written and flushed: the frame is reported as written, or the session ends
// when the write failed.
func (c *sseConn) onFlush(ok bool) {
	var f realtime.Frame
	c.mu.Lock()
	if n := len(c.inflight); n > 0 {
		f = c.inflight[0]
		copy(c.inflight, c.inflight[1:])
		c.inflight[n-1] = realtime.Frame{}
		c.inflight = c.inflight[:n-1]
	}
	c.mu.Unlock()
	select {
	case c.flushed <- struct{}{}:
	default:
	}
	hub := c.t.api.Hub
	switch {
	case !ok:
		hub.End(c.s, realtime.ReasonClientClose)
	case f.Type != "":
		hub.Written(c.s, []realtime.Frame{f})
	}
}

// sseWriter is the ResponseWriter the library writes to. It arms a write
// deadline for every event and reports every flush after the first (which
// only sends the header) to the connection; a failed write fails the event.
type sseWriter struct {
	http.ResponseWriter
	c       *sseConn
	status  int
	headers bool // the header flush has happened
	armed   bool // the event being written has its deadline
	failed  bool
}

// WriteHeader records the status the library answers.
func (w *sseWriter) WriteHeader(code int) {
	w.status = code
	w.ResponseWriter.WriteHeader(code)
}

// Write writes part of an event.
func (w *sseWriter) Write(p []byte) (int, error) {
	if !w.armed {
		w.c.arm()
		w.armed = true
	}
	n, err := w.ResponseWriter.Write(p)
	if err != nil {
		w.failed = true
	}
	return n, err
}

// Flush sends what was written; after the header it ends one event.
func (w *sseWriter) Flush() {
	if !w.armed {
		w.c.arm()
	}
	err := flushError(w.ResponseWriter)
	w.armed = false
	if !w.headers {
		w.headers = true
		if err != nil {
			w.c.t.api.Hub.End(w.c.s, realtime.ReasonClientClose)
		}
		return
	}
	w.c.onFlush(err == nil && !w.failed)
	w.failed = false
}

// Unwrap lets http.ResponseController reach the connection.
func (w *sseWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// flushError flushes w and reports a failure, looking through wrappers (chi's
// logger wraps with a Flush that hides errors) for FlushError.
func flushError(w http.ResponseWriter) error {
	for cur := w; ; {
		switch v := cur.(type) {
		case interface{ FlushError() error }:
			return v.FlushError()
		case interface{ Unwrap() http.ResponseWriter }:
			cur = v.Unwrap()
		default:
			return http.NewResponseController(w).Flush()
		}
	}
}

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

// sseStreamBuffer is how many events one stream of the SSE library holds
// before Publish blocks (its subscriber holds 64 more). The library
// allocates the whole channel per stream, so it stays small: a session's
// frames wait in the session's own bounded queue.
const sseStreamBuffer = 32

// sseKA is the keep-alive comment of a stream served through the library.
var sseKA = []byte("ka")

// sseStreams serves event streams whose connection cannot be taken over:
// an HTTP/2 stream shares its connection with other requests, so there is
// no hijack (hijack.go). These go through r3labs/sse/v2 (../shared/LIBRARIES.md
// lists its traps; each is handled here), one library stream per session,
// named by the session's connection id. The session layer is the one under
// every transport: a pump goroutine drains the realtime.Session (Wake,
// Take, Done) into the stream in order, as the hijacked path's frameWriter
// does onto its connection.
//
// Lifecycle of one stream: serve creates it and serves the request through
// the library with a context of its own; OnSubscribe starts the pump (events
// published before the subscriber registers would be dropped); the session
// ending makes the pump publish what is left, bye, and an empty event, on
// which the library ends the response; the request's context ending (the
// client left, or an eviction) makes the library unsubscribe, and
// OnUnsubscribe removes the stream. RemoveStream is never called while a
// subscriber is connected: that leaks the subscriber's goroutine.
type sseStreams struct {
	api *API
	lib *sse.Server

	mu   sync.Mutex
	live map[string]*sseStream // by stream id, while its request is served
}

// newSSEStreams sets the library up as LIBRARIES.md says: no AutoReplay
// (replay comes from Postgres, and the in-memory log would grow without end
// and rewrite ids), no EventTTL, SplitData on, no base64, no AutoStream (a
// stream exists only for a registered session), and the callbacks set
// before any stream is created (streams copy them).
func newSSEStreams(a *API) *sseStreams {
	t := &sseStreams{api: a, live: make(map[string]*sseStream)}
	lib := sse.New()
	lib.AutoReplay = false
	lib.AutoStream = false
	lib.EventTTL = 0
	lib.SplitData = true
	lib.EncodeBase64 = false
	lib.BufferSize = sseStreamBuffer
	lib.Headers = map[string]string{
		"Cache-Control":     "no-cache, no-transform",
		"X-Accel-Buffering": "no",
	}
	lib.OnSubscribe = t.subscribed
	lib.OnUnsubscribe = func(id string, _ *sse.Subscriber) { lib.RemoveStream(id) }
	t.lib = lib
	return t
}

// sseStream is one session served through the library.
type sseStream struct {
	t      *sseStreams
	s      *realtime.Session
	id     string
	ctx    context.Context // the request's, cancelled to end it
	cancel context.CancelFunc
	every  time.Duration // keep-alive interval
	ready  chan struct{} // closed once the library has registered the subscriber

	// mu guards rc against the handler's return: net/http's HTTP/2 writer
	// must not be touched once its handler has returned.
	mu     sync.Mutex
	rc     *http.ResponseController
	served bool

	// Owned by the pump.
	lastID    int64 // highest seq published: the id of every event
	sentRetry bool
}

// serve carries the registered session s over w until it ends or the
// client leaves; cursor is what the client holds. It returns once the
// response is over and the pump has stopped.
func (t *sseStreams) serve(w http.ResponseWriter, r *http.Request, s *realtime.Session, cursor int64) {
	a := t.api
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	st := &sseStream{t: t, s: s, id: s.ConnID, ctx: ctx, cancel: cancel, ready: make(chan struct{}),
		rc: http.NewResponseController(w), lastID: cursor,
		every: min(sseKeepAlive, a.Hub.Config().PingInterval)}
	release := a.Hub.Hold()
	defer release()
	t.mu.Lock()
	t.live[st.id] = st
	t.mu.Unlock()
	defer func() {
		t.mu.Lock()
		delete(t.live, st.id)
		t.mu.Unlock()
	}()
	t.lib.CreateStream(st.id)

	// The library picks the stream by ?stream= alone and would answer 400
	// to a Last-Event-ID it cannot parse: the cursor is already read (and
	// replay comes from Postgres), so the request it sees has neither.
	lr := r.WithContext(ctx)
	u := *r.URL
	u.RawQuery = url.Values{"stream": {st.id}}.Encode()
	lr.URL = &u
	lr.Header = r.Header.Clone()
	lr.Header.Del("Last-Event-ID")

	pumped := make(chan struct{})
	go func() {
		defer close(pumped)
		st.pump(cursor)
	}()
	if f, ok := w.(http.Flusher); ok {
		sw := &sseWriter{ResponseWriter: w, flusher: f, stall: time.AfterFunc(writeWait, st.evict)}
		sw.stall.Stop()
		defer sw.stall.Stop()
		w = sw
	}
	t.lib.ServeHTTP(w, lr)
	st.mu.Lock()
	st.served = true
	st.mu.Unlock()
	cancel()
	<-pumped
}

// subscribed is the library's OnSubscribe (run on a goroutine of its own):
// the stream's subscriber is registered, so what is published from now on
// reaches it.
func (t *sseStreams) subscribed(id string, _ *sse.Subscriber) {
	t.mu.Lock()
	st := t.live[id]
	t.mu.Unlock()
	if st != nil {
		close(st.ready)
	}
}

// pump is the session's single writer: it queues the replay, waits for the
// subscriber, then moves the session's frames into the stream in order,
// with a keep-alive comment when the stream is quiet, until the session
// ends (finish) or the request's context does (the client left).
func (st *sseStream) pump(cursor int64) {
	a, s := st.t.api, st.s
	a.replay(s, cursor)
	select {
	case <-st.ready:
	case <-st.ctx.Done():
		a.Hub.End(s, realtime.ReasonClientClose)
		return
	}
	ka := time.NewTimer(st.every)
	defer ka.Stop()
	for {
		select {
		case <-s.Done():
			st.finish()
			return
		case <-st.ctx.Done():
			a.Hub.End(s, realtime.ReasonClientClose)
			return
		case <-s.Wake():
			frames := s.Take()
			if !st.publish(st.events(frames)) {
				a.Hub.End(s, realtime.ReasonClientClose)
				return
			}
			a.Hub.Written(s, frames)
		case <-ka.C:
			st.publish([]*sse.Event{{Comment: sseKA}})
		}
		ka.Reset(st.every)
	}
}

// finish sends what an ended session still owes: the frames queued and bye
// where its reason has one, then the empty event that makes the library end
// the response. A client that closed gets nothing: its request ends.
func (st *sseStream) finish() {
	a, s := st.t.api, st.s
	reason := s.Reason()
	if reason == realtime.ReasonClientClose {
		st.cancel()
		return
	}
	frames := s.Take()
	if reason.SendsBye() {
		frames = append(frames, a.Hub.Bye(reason))
	}
	// The writes of an ended session get byeWait in all, as on the hijacked path.
	time.AfterFunc(byeWait, st.evict)
	evs := append(st.events(frames), &sse.Event{}) // empty: the library's end of the response
	if st.publish(evs) {
		a.Hub.Written(s, frames)
	}
}

// events builds one fresh event per frame (an event published to a stream
// is the library's from then on). Every event carries the cursor as its id,
// since the library writes an id line on each and an empty one would reset
// the browser's Last-Event-ID; the first also carries the reconnect delay.
func (st *sseStream) events(frames []realtime.Frame) []*sse.Event {
	evs := make([]*sse.Event, 0, len(frames)+1)
	for _, f := range frames {
		if f.Type == realtime.TypeNotification && f.Seq > st.lastID {
			st.lastID = f.Seq
		}
		ev := &sse.Event{ID: strconv.AppendInt(nil, st.lastID, 10), Event: []byte(f.Type), Data: f.JSON}
		if !st.sentRetry {
			ev.Retry = strconv.AppendInt(nil, st.t.api.Hub.Config().ByeRetry.Milliseconds(), 10)
			st.sentRetry = true
		}
		evs = append(evs, ev)
	}
	return evs
}

// publish hands evs to the stream in order. It reports false once the
// request is over. Publish blocks while the stream's buffers are full; a
// client that stopped reading is cut by the write timer (sseWriter) rather
// than here, since the library's buffers count events, not bytes.
func (st *sseStream) publish(evs []*sse.Event) bool {
	for _, ev := range evs {
		st.t.lib.Publish(st.id, ev)
	}
	return st.ctx.Err() == nil
}

// sseWriter is the ResponseWriter the library writes through. Each write
// and flush is bounded by writeWait, a timer armed while it runs (evict on
// expiry), as the hijacked path bounds each write with a deadline: an
// HTTP/2 write deadline is a timer on the whole stream, not on one write,
// so it cannot serve here.
type sseWriter struct {
	http.ResponseWriter
	flusher http.Flusher
	stall   *time.Timer
}

// Write writes p within writeWait.
func (w *sseWriter) Write(p []byte) (int, error) {
	w.stall.Reset(writeWait)
	defer w.stall.Stop()
	return w.ResponseWriter.Write(p)
}

// Flush sends what is buffered within writeWait.
func (w *sseWriter) Flush() {
	w.stall.Reset(writeWait)
	defer w.stall.Stop()
	w.flusher.Flush()
}

// Unwrap is for http.ResponseController.
func (w *sseWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// evict ends a stream whose client stopped reading (or whose bye took
// longer than byeWait), the clean way LIBRARIES.md gives: cancel its
// request, and cut the write the library is stuck in (cancel alone leaves
// it there), so the library unsubscribes and the stream is removed. The
// session ends as client_close, no bye, unless it ended already: as on
// the hijacked path, where the write that times out fails. After the
// response is over it changes nothing.
func (st *sseStream) evict() {
	st.t.api.Hub.End(st.s, realtime.ReasonClientClose)
	st.cancel()
	st.mu.Lock()
	defer st.mu.Unlock()
	if !st.served {
		_ = st.rc.SetWriteDeadline(time.Now())
	}
}

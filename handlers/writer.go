package handlers

import (
	"sync/atomic"
	"time"

	"github.com/notifyd/notifyd/handlers/realtime"
)

// Write deadlines of every transport.
const (
	// writeWait bounds one write to a client.
	writeWait = 10 * time.Second
	// byeWait bounds the writes of an ended session: what is left and bye.
	byeWait = time.Second
)

// frameWriter is the single writer of a session on a connection that keeps
// no idle writer goroutine (WebSocket, and SSE on its hijacked connection):
// a goroutine runs only while the session has frames queued, and the same
// goroutine finishes the connection when the session ends. Who may write
// when is the idle WebSocket's invariant (idlews.go); SSE follows it too.
type frameWriter struct {
	s   *realtime.Session
	hub *realtime.Hub
	// write sends frames; false when the connection failed.
	write func([]realtime.Frame) bool
	// finish runs once, when the session has ended: it writes what is left
	// and bye, and closes the connection.
	finish func()
	// deadline sets the connection's write deadline (its
	// SetWriteDeadline): writeWait for each write (armDeadline), cut to
	// byeWait when the session ends while a write is under way, so that a
	// client that stopped reading does not hold the writer (and the bye
	// after it) for a whole write timeout.
	deadline func(time.Time) error
	// busy is true while a goroutine writes (at most one does: it is the
	// connection's only writer of data).
	busy atomic.Bool
}

// kick starts a flush unless a writer runs. The session calls it (with its
// lock held) whenever a frame is queued and when it ends.
func (w *frameWriter) kick() {
	if w.busy.CompareAndSwap(false, true) {
		go w.flush()
		return
	}
	if chanClosed(w.s.Done()) {
		_ = w.deadline(time.Now().Add(byeWait))
	}
}

// flush writes what is queued until nothing is, then ends; when the session
// has ended it finishes the connection.
func (w *frameWriter) flush() {
	s := w.s
	for {
		if chanClosed(s.Done()) {
			// Before Wake: an ended session's frames go out with its bye.
			w.finish()
			return // busy stays true: nothing is written after the end
		}
		select {
		case <-s.Done():
			continue
		case <-s.Wake():
			if !w.write(s.Take()) {
				w.hub.End(s, realtime.ReasonClientClose)
			}
			continue
		default:
		}
		w.busy.Store(false)
		// A frame queued (or an end) after the select above may have found
		// busy still true and started nothing; its Wake or Done signal is
		// left behind, so look once more before leaving.
		if len(s.Wake()) == 0 && !chanClosed(s.Done()) {
			return
		}
		if !w.busy.CompareAndSwap(false, true) {
			return // a kick started another flush
		}
	}
}

// claim makes the calling goroutine the writer, if no other is; it must then
// call flushClaimed. A reader answering a ping claims first and queues the
// pong after, so the queueing starts no goroutine, and writes it itself:
// starting a writer goroutine for it would wake a second thread per ping.
func (w *frameWriter) claim() bool { return w.busy.CompareAndSwap(false, true) }

// flushClaimed writes what is queued, once, from the goroutine that claimed
// the writer, and gives the claim up. Whatever is queued after that, and the
// end of the session, are left to a flush goroutine, so the caller is never
// kept long.
func (w *frameWriter) flushClaimed() {
	s := w.s
	if !chanClosed(s.Done()) {
		select {
		case <-s.Wake(): // taken with the frames below
		default:
		}
		if !w.write(s.Take()) {
			w.hub.End(s, realtime.ReasonClientClose)
		}
	}
	w.unclaim()
}

// unclaim gives up a claim without writing what is queued: a flush goroutine
// is started if anything is, or if the session has ended.
func (w *frameWriter) unclaim() {
	s := w.s
	w.busy.Store(false)
	if len(s.Wake()) > 0 || chanClosed(s.Done()) {
		w.kick()
	}
}

// armDeadline gives the write about to start its deadline: writeWait, or
// byeWait once the session has ended. It looks at the end after setting, so
// an end whose cut (kick) came just before still gets the short one.
func (w *frameWriter) armDeadline() {
	_ = w.deadline(time.Now().Add(writeWait))
	if chanClosed(w.s.Done()) {
		_ = w.deadline(time.Now().Add(byeWait))
	}
}

// leftover is what an ended session still sends: the frames queued, then bye
// where its reason has one. ok is false when the client closed (nothing can
// reach it).
func (w *frameWriter) leftover() (frames []realtime.Frame, ok bool) {
	reason := w.s.Reason()
	if reason == realtime.ReasonClientClose {
		return nil, false
	}
	frames = w.s.Take()
	if reason.SendsBye() {
		frames = append(frames, w.hub.Bye(reason))
	}
	return frames, true
}

func chanClosed(done <-chan struct{}) bool {
	select {
	case <-done:
		return true
	default:
		return false
	}
}

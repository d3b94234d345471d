package handlers

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/notifyd/notifyd/handlers/realtime"
)

// testHub is a hub whose sessions may queue many frames (the writer tests
// queue thousands).
func testHub() *realtime.Hub {
	return realtime.NewHub(realtime.Config{
		PingInterval: 20 * time.Second, PingTimeout: 60 * time.Second, SweepEvery: 250 * time.Millisecond,
		QueueLimit: 10_000, ByeRetry: time.Second,
	}, realtime.Hooks{})
}

// liveSession registers a session on hub and takes its hello and synced off
// its queue, with their wake signal, as a writer that wrote them leaves it.
func liveSession(t testing.TB, hub *realtime.Hub) *realtime.Session {
	t.Helper()
	s := hub.NewSession(realtime.SessionInfo{User: "alice", Device: "d", Transport: realtime.WebSocket}, 0)
	if err := hub.Register(s, ""); err != nil {
		t.Fatal(err)
	}
	s.FinishReplay(nil, 0, false)
	s.Take()
	<-s.Wake()
	return s
}

// testFrame is a frame that names its sender and its number.
func testFrame(sender, i int) realtime.Frame {
	return realtime.Frame{Type: "test", JSON: fmt.Appendf(nil, `{"sender":%d,"i":%d}`, sender, i)}
}

// idleWS is a wsConn as serveWS makes it, over a real loopback socket,
// before its writer and reader start, and the client's end of the socket,
// read and written raw.
type idleWS struct {
	c      *wsConn
	client net.Conn
	br     *bufio.Reader // the client's reads
}

func newIdleWS(t testing.TB) *idleWS {
	t.Helper()
	hub := testHub()
	a := &API{Options: Options{Hub: hub, Log: slog.New(slog.DiscardHandler), Limits: Limits{MaxMessageBytes: 64 << 10}}}
	s := liveSession(t, hub)
	conns := make(chan *wsConn, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		wr := &wsResponse{ResponseWriter: w}
		conn, err := upgrader.Upgrade(wr, r, nil)
		if err != nil {
			t.Error(err)
			close(conns)
			return
		}
		conns <- a.newWSConn(s, conn, wr.br)
	}))
	t.Cleanup(srv.Close)
	client, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(srv.URL, "http"), nil)
	if err != nil {
		t.Fatal(err)
	}
	c := <-conns
	if c == nil {
		t.FailNow()
	}
	if c.raw == nil {
		t.Fatal("the connection has no RawConn: park would read in place")
	}
	t.Cleanup(func() {
		hub.End(s, realtime.ReasonClientClose)
		c.ping.Stop()
		client.Close()
		c.conn.Close()
	})
	raw := client.NetConn()
	return &idleWS{c: c, client: raw, br: bufio.NewReader(raw)}
}

// send writes one masked client frame (RFC 6455, section 5.2) of opcode op.
func (w *idleWS) send(t *testing.T, op byte, payload []byte) {
	t.Helper()
	if _, err := w.client.Write(clientFrame(op, payload)); err != nil {
		t.Fatal(err)
	}
}

func clientFrame(op byte, payload []byte) []byte {
	if len(payload) > 125 {
		panic("clientFrame: payload too long")
	}
	mask := [4]byte{0x37, 0xfa, 0x21, 0x3d}
	b := []byte{0x80 | op, 0x80 | byte(len(payload)), mask[0], mask[1], mask[2], mask[3]}
	for i, c := range payload {
		b = append(b, c^mask[i%4])
	}
	return b
}

// read reads one server frame (unmasked, at most 65535 bytes) and returns
// its first byte and its payload.
func (w *idleWS) read(t *testing.T) (byte, []byte) {
	t.Helper()
	_ = w.client.SetReadDeadline(time.Now().Add(5 * time.Second))
	var h [2]byte
	if _, err := io.ReadFull(w.br, h[:]); err != nil {
		t.Fatalf("reading a frame: %v", err)
	}
	n := int(h[1])
	switch {
	case h[1]&0x80 != 0:
		t.Fatalf("server frame masked: % x", h)
	case n == 126:
		var l [2]byte
		if _, err := io.ReadFull(w.br, l[:]); err != nil {
			t.Fatal(err)
		}
		n = int(l[0])<<8 | int(l[1])
	case n == 127:
		t.Fatal("server frame over 64 KiB")
	}
	payload := make([]byte, n)
	if _, err := io.ReadFull(w.br, payload); err != nil {
		t.Fatalf("reading a frame's %d bytes: %v", n, err)
	}
	return h[0], payload
}

// quiet fails if the server writes anything within a moment.
func (w *idleWS) quiet(t *testing.T) {
	t.Helper()
	_ = w.client.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if b, err := w.br.Peek(1); err == nil {
		t.Fatalf("the server wrote % x", b)
	}
}

// checkPong checks that payload is the pong answerPing sends, with a server
// time close to now.
func checkPong(t *testing.T, b0 byte, payload []byte) {
	t.Helper()
	if b0 != 0x81 {
		t.Fatalf("pong frame starts % x, want 81 (FIN, text)", b0)
	}
	var m struct {
		Type       string `json:"type"`
		ServerTime string `json:"server_time"`
	}
	if err := json.Unmarshal(payload, &m); err != nil || m.Type != "pong" {
		t.Fatalf("pong %q: %v", payload, err)
	}
	at, err := time.Parse(realtime.TimeFormat, m.ServerTime)
	if err != nil || time.Since(at).Abs() > 10*time.Second {
		t.Fatalf("pong's server_time %q: %v", m.ServerTime, err)
	}
}

// readPong reads one frame and checks that it is a pong.
func (w *idleWS) readPong(t *testing.T) {
	t.Helper()
	b0, payload := w.read(t)
	checkPong(t, b0, payload)
}

// recordingWriter replaces c's frame writes (only the socket's frames go
// elsewhere): every batch is kept, and a write waits while hold is set.
type recordingWriter struct {
	mu      sync.Mutex
	batches [][]string // frame types of each write
	entered chan struct{}
	hold    chan struct{}
}

func (r *recordingWriter) write(frames []realtime.Frame) bool {
	if r.entered != nil {
		r.entered <- struct{}{}
	}
	if r.hold != nil {
		<-r.hold
	}
	types := make([]string, len(frames))
	for i, f := range frames {
		types[i] = f.Type
	}
	r.mu.Lock()
	r.batches = append(r.batches, types)
	r.mu.Unlock()
	return true
}

func (r *recordingWriter) written() [][]string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([][]string(nil), r.batches...)
}

// With no writer running and nothing queued, answerPing writes the pong
// itself, as one text frame straight on the socket (no writer goroutine, no
// frame queued), and leaves the writer free.
func TestAnswerPingRawPong(t *testing.T) {
	w := newIdleWS(t)
	rec := &recordingWriter{}
	w.c.w.write = rec.write
	w.c.s.SetNotify(w.c.w.kick)
	w.c.answerPing()
	b0, payload := w.read(t)
	checkPong(t, b0, payload)
	if got := rec.written(); len(got) != 0 {
		t.Fatalf("the pong went through the frame writer: %v", got)
	}
	if w.c.w.busy.Load() {
		t.Fatal("the writer is still claimed after the pong")
	}
	// The frame is appendTextFrame's: a 2-byte header and the pong's JSON.
	if want := appendTextFrame(nil, payload); !bytes.Equal(append([]byte{b0, byte(len(payload))}, payload...), want) {
		t.Fatalf("pong frame is not appendTextFrame's framing of its payload")
	}
	w.quiet(t)
}

// answerPingWithin answers a ping on another goroutine and fails with msg
// unless that returns within d.
func (w *idleWS) answerPingWithin(t *testing.T, d time.Duration, msg string) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		w.c.answerPing()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(d):
		t.Fatal(msg)
	}
}

// countDeadlines makes w's writer count the write deadlines it arms, each
// set to d from now, and those it clears.
func (w *idleWS) countDeadlines(d time.Duration) (armed, cleared *atomic.Int32) {
	armed, cleared = new(atomic.Int32), new(atomic.Int32)
	nc := w.c.conn.NetConn()
	w.c.w.deadline = func(at time.Time) error {
		if at.IsZero() {
			cleared.Add(1)
			return nc.SetWriteDeadline(at)
		}
		armed.Add(1)
		return nc.SetWriteDeadline(time.Now().Add(d))
	}
	return armed, cleared
}

// A pong the socket takes at once arms no write deadline (no timer per
// ping); one that meets a deadline an earlier write left behind, passed,
// arms a new one, goes out and clears it, so the pong after arms nothing.
// Failed before: every pong armed the deadline.
func TestAnswerPingDeadlineOnlyWhenNeeded(t *testing.T) {
	w := newIdleWS(t)
	armed, cleared := w.countDeadlines(writeWait)
	w.c.s.SetNotify(w.c.w.kick)
	w.c.answerPing()
	w.readPong(t)
	if n := armed.Load(); n != 0 {
		t.Fatalf("a pong the socket took at once armed %d write deadlines", n)
	}
	_ = w.c.conn.NetConn().SetWriteDeadline(time.Now().Add(-time.Second)) // an earlier write's, passed
	w.c.answerPing()
	w.readPong(t)
	if a, c := armed.Load(), cleared.Load(); a != 1 || c != 1 {
		t.Fatalf("a pong past an old deadline armed %d and cleared %d write deadlines, want 1 and 1", a, c)
	}
	w.c.answerPing()
	w.readPong(t)
	if a := armed.Load(); a != 1 {
		t.Fatalf("the pong after armed a deadline again (%d in all)", a)
	}
	if chanClosed(w.c.s.Done()) {
		t.Fatalf("the session ended (%s)", w.c.s.Reason())
	}
}

// A delivery written on a plain socket arms no write deadline either, and
// leaves none behind to refuse the next pong. Failed before: every write
// armed one, which passed and made the next pong arm and clear one.
func TestWriteArmsNoDeadline(t *testing.T) {
	w := newIdleWS(t)
	armed, cleared := w.countDeadlines(writeWait)
	w.c.s.SetNotify(w.c.w.kick)
	if !w.c.write([]realtime.Frame{testFrame(0, 0), testFrame(0, 1)}) {
		t.Fatal("write failed")
	}
	for range 2 {
		if b0, _ := w.read(t); b0 != 0x81 {
			t.Fatalf("frame starts % x", b0)
		}
	}
	w.c.answerPing()
	w.readPong(t)
	if a, c := armed.Load(), cleared.Load(); a != 0 || c != 0 {
		t.Fatalf("a delivery and a pong armed %d and cleared %d write deadlines, want none", a, c)
	}
}

// A pong to a client that reads nothing, its socket full, waits for room
// until the deadline it arms, then ends the session.
func TestAnswerPingFullSocketEnds(t *testing.T) {
	w := newIdleWS(t)
	nc := w.c.conn.NetConn()
	// Fill the client's receive window and the server's send buffer, until not
	// even a byte fits, again after what was in flight was acknowledged.
	_ = w.client.(*net.TCPConn).SetReadBuffer(4 << 10)
	_ = nc.(*net.TCPConn).SetWriteBuffer(4 << 10)
	for _, size := range []int{64 << 10, 1, 1, 1} {
		junk := make([]byte, size)
		for {
			_ = nc.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
			if _, err := nc.Write(junk); err != nil {
				break
			}
		}
	}
	_ = nc.SetWriteDeadline(time.Time{})
	armed, _ := w.countDeadlines(200 * time.Millisecond)
	w.c.s.SetNotify(w.c.w.kick)
	w.answerPingWithin(t, 10*time.Second, "the pong to a full socket never gave up")
	if n := armed.Load(); n != 1 {
		t.Fatalf("the pong armed %d write deadlines, want 1", n)
	}
	waitFor(t, "the session ended", func() bool { return chanClosed(w.c.s.Done()) })
}

// A ping answered while a flush is writing does not wait for it: the pong is
// queued behind the frames being written and goes out by that writer, after
// them, and nothing reaches the socket from answerPing itself.
func TestAnswerPingWhileFlushRuns(t *testing.T) {
	w := newIdleWS(t)
	rec := &recordingWriter{entered: make(chan struct{}, 4), hold: make(chan struct{})}
	w.c.w.write = rec.write
	w.c.s.SetNotify(w.c.w.kick)
	w.c.s.Send(testFrame(0, 0)) // starts a flush, which blocks in write
	<-rec.entered
	w.answerPingWithin(t, 5*time.Second, "answerPing waited for the running flush")
	close(rec.hold)
	select {
	case <-rec.entered: // the flush's second write: the pong
	case <-time.After(5 * time.Second):
		t.Fatal("the flush wrote no second time")
	}
	waitFor(t, "the flush wrote the pong and ended", func() bool { return !w.c.w.busy.Load() && len(rec.written()) >= 2 })
	got := rec.written()
	if fmt.Sprint(got) != "[[test] [pong]]" {
		t.Fatalf("writes %v, want the frame then the pong", got)
	}
	w.quiet(t)
}

// A ping answered while frames are queued but no writer runs sends the
// frames, then the pong, in one write from the answering goroutine.
func TestAnswerPingAfterQueuedFrames(t *testing.T) {
	w := newIdleWS(t)
	rec := &recordingWriter{}
	w.c.w.write = rec.write
	w.c.s.Send(testFrame(0, 0)) // no notify yet: queued, no writer started
	w.c.s.Send(testFrame(0, 1))
	w.c.s.SetNotify(w.c.w.kick)
	w.c.answerPing()
	if got := rec.written(); fmt.Sprint(got) != "[[test test pong]]" {
		t.Fatalf("writes %v, want one write of both frames and the pong", got)
	}
	if w.c.w.busy.Load() {
		t.Fatal("the writer is still claimed")
	}
}

// park wakes when the socket becomes readable: a lone ping it answers and a
// lone empty pong it counts as a sign of life, each without leaving park;
// any other message goes through readLoop (gorilla), which parks again once
// its buffer is empty; the client's close ends the session.
func TestParkWakesOnReadable(t *testing.T) {
	w := newIdleWS(t)
	s := w.c.s
	s.SetNotify(w.c.w.kick)
	go w.c.park()

	before := time.Now()
	w.send(t, 0x1, pingMessage)
	w.readPong(t)
	if s.LastSeen().Before(before) {
		t.Fatal("a ping did not count as a sign of life")
	}

	before = time.Now()
	w.send(t, 0xa, nil) // an empty pong, as a browser answers our ping frame
	waitFor(t, "the pong counted as a sign of life", func() bool { return !s.LastSeen().Before(before) })
	w.quiet(t)

	// Not the lone ping frame (spaces around it): read by gorilla, still a ping.
	w.send(t, 0x1, []byte(` {"type":"ping"} `))
	w.readPong(t)
	// A ping control frame: gorilla answers it with a pong control frame.
	w.send(t, 0x9, []byte("hi"))
	if b0, payload := w.read(t); b0 != 0x8a || string(payload) != "hi" {
		t.Fatalf("answer to a ping frame: % x %q, want a pong frame with its payload", b0, payload)
	}
	// And after it a lone ping is answered still (read by gorilla, which
	// waits for the next message after a control frame, or by park).
	w.send(t, 0x1, pingMessage)
	w.readPong(t)

	w.client.Close()
	select {
	case <-s.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the client's close did not end the session")
	}
	if got := s.Reason(); got != realtime.ReasonClientClose {
		t.Fatalf("ended as %q, want %q", got, realtime.ReasonClientClose)
	}
}

// readable takes a lone ping or empty pong off the socket (and only those),
// and reports a socket with nothing to read as not readable.
func TestReadable(t *testing.T) {
	w := newIdleWS(t)
	check := func(name string, wantReady bool, want byte, left int) {
		t.Helper()
		var ready bool
		w.c.took = tookNothing
		if err := w.c.raw.Read(func(fd uintptr) bool { ready = w.c.readable(fd); return true }); err != nil {
			t.Fatal(err)
		}
		if ready != wantReady || w.c.took != want {
			t.Fatalf("%s: readable %v, took %d; want %v, %d", name, ready, w.c.took, wantReady, want)
		}
		var b [64]byte
		n := 0
		if left > 0 {
			var err error
			n, err = io.ReadAtLeast(w.c.br, b[:], left)
			if err != nil {
				t.Fatal(err)
			}
		}
		if n != left {
			t.Fatalf("%s: %d bytes left on the socket, want %d", name, n, left)
		}
	}
	check("nothing", false, tookNothing, 0)
	ping := clientFrame(0x1, pingMessage)
	pong := clientFrame(0xa, nil)
	for _, c := range []struct {
		name  string
		b     []byte
		took  byte
		stays int
	}{
		{"lone ping", ping, tookPing, 0},
		{"lone pong", pong, tookPong, 0},
		{"two pings", append(append([]byte{}, ping...), ping...), tookNothing, 2 * len(ping)},
		{"other text", clientFrame(0x1, []byte(`{"type":"ack","ids":[]}`)), tookNothing, 6 + 23},
		{"pong with payload", clientFrame(0xa, []byte("x")), tookNothing, 7},
	} {
		if _, err := w.client.Write(c.b); err != nil {
			t.Fatal(err)
		}
		// Wait until the bytes have arrived whole, so the peek sees them all.
		waitFor(t, c.name+" arrives", func() bool {
			var n int
			_ = w.c.raw.Read(func(fd uintptr) bool {
				var b [64]byte
				n, _ = recvNow(fd, b[:], syscall.MSG_PEEK)
				return true
			})
			return n == len(c.b)
		})
		check(c.name, true, c.took, c.stays)
	}
}

// isPingFrame knows the client's ping under any mask, and nothing else: not
// another payload, an unmasked or non-final frame, or another opcode.
func TestIsPingFrame(t *testing.T) {
	frame := func(b0, b1 byte, mask [4]byte, payload string) []byte {
		b := []byte{b0, b1, mask[0], mask[1], mask[2], mask[3]}
		for i := range len(payload) {
			b = append(b, payload[i]^mask[i%4])
		}
		return b
	}
	for _, mask := range [][4]byte{{0, 0, 0, 0}, {1, 2, 3, 4}, {0xff, 0x80, 0x7f, 0x01}} {
		if !isPingFrame(frame(0x81, 0x8f, mask, `{"type":"ping"}`)) {
			t.Fatalf("the ping under mask %v not known", mask)
		}
		for name, b := range map[string][]byte{
			"other payload": frame(0x81, 0x8f, mask, `{"type":"pong"}`),
			"not final":     frame(0x01, 0x8f, mask, `{"type":"ping"}`),
			"binary":        frame(0x82, 0x8f, mask, `{"type":"ping"}`),
			"unmasked":      frame(0x81, 0x0f, mask, `{"type":"ping"}`),
			"close":         frame(0x88, 0x8f, mask, `{"type":"ping"}`),
		} {
			if len(b) == wsPingFrame && isPingFrame(b) {
				t.Fatalf("%s (mask %v) taken for a ping", name, mask)
			}
		}
	}
}

// claim, unclaim, flushClaimed and kick keep one writer at a time while
// senders queue frames and other goroutines claim the writer (as park and
// SSE's keep-alive do): every frame is written once, each sender's in order,
// and after the end finish runs once and nothing else is written.
func TestFrameWriterOneWriter(t *testing.T) {
	hub := testHub()
	s := liveSession(t, hub)
	const senders, perSender, claimers = 4, 500, 2
	var active, finished atomic.Int32
	var mu sync.Mutex
	next := make([]int, senders) // each sender's next frame number
	var total int
	all := make(chan struct{})
	finishedCh := make(chan struct{})
	w := &frameWriter{s: s, hub: hub, deadline: func(time.Time) error { return nil }}
	w.write = func(frames []realtime.Frame) bool {
		if n := active.Add(1); n != 1 {
			t.Errorf("%d writers at once", n)
		}
		defer active.Add(-1)
		if finished.Load() > 0 {
			t.Error("a write after finish")
		}
		mu.Lock()
		defer mu.Unlock()
		for _, f := range frames {
			var m struct{ Sender, I int }
			if err := json.Unmarshal(f.JSON, &m); err != nil {
				t.Errorf("frame %q: %v", f.JSON, err)
				continue
			}
			if m.I != next[m.Sender] {
				t.Errorf("sender %d: frame %d written, want %d", m.Sender, m.I, next[m.Sender])
			}
			next[m.Sender] = m.I + 1
			total++
			if total == senders*perSender {
				close(all)
			}
		}
		return true
	}
	w.finish = func() {
		if active.Add(1) != 1 {
			t.Error("finish runs beside a writer")
		}
		defer active.Add(-1)
		if finished.Add(1) == 1 {
			close(finishedCh)
		}
	}
	s.SetNotify(w.kick)
	var wg sync.WaitGroup
	for g := range senders {
		wg.Go(func() {
			for i := range perSender {
				if !s.Send(testFrame(g, i)) {
					t.Errorf("sender %d: frame %d not queued", g, i)
					return
				}
			}
		})
	}
	for g := range claimers {
		wg.Go(func() {
			for i := range perSender {
				if !w.claim() {
					continue
				}
				if n := active.Add(1); n != 1 {
					t.Errorf("%d writers at once, one of them a claim", n)
				}
				active.Add(-1)
				if (g+i)%2 == 0 {
					w.flushClaimed()
				} else {
					w.unclaim()
				}
			}
		})
	}
	wg.Wait()
	select {
	case <-all:
	case <-time.After(10 * time.Second):
		mu.Lock()
		t.Fatalf("%d of %d frames written", total, senders*perSender)
	}
	hub.End(s, realtime.ReasonKicked)
	select {
	case <-finishedCh:
	case <-time.After(10 * time.Second):
		t.Fatal("finish did not run after the end")
	}
	if w.claim() {
		t.Fatal("the writer can be claimed after finish")
	}
	w.kick()
	if s.Send(testFrame(0, perSender)) {
		t.Fatal("a frame was queued after the end")
	}
	if got := finished.Load(); got != 1 {
		t.Fatalf("finish ran %d times", got)
	}
}

// TestGorillaInternals pins what the idle WebSocket relies on inside
// gorilla/websocket (see idlews.go); a gorilla version that changes any of
// it fails here, before it costs idle connections memory or breaks park.
func TestGorillaInternals(t *testing.T) {
	// upgrade serves one upgrade through a hijacked reader of size bufSize
	// (0: wsResponse's) and hands the connection and that reader to check,
	// with the client's connection.
	upgrade := func(t *testing.T, u *websocket.Upgrader, bufSize int, check func(*websocket.Conn, *bufio.Reader, *websocket.Conn)) {
		t.Helper()
		done := make(chan struct{})
		var client *websocket.Conn
		ready := make(chan struct{})
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			defer close(done)
			var hw http.ResponseWriter
			var br func() *bufio.Reader
			if bufSize == 0 {
				wr := &wsResponse{ResponseWriter: w}
				hw, br = wr, func() *bufio.Reader { return wr.br }
			} else {
				sr := &sizedResponse{ResponseWriter: w, size: bufSize}
				hw, br = sr, func() *bufio.Reader { return sr.br }
			}
			conn, err := u.Upgrade(hw, r, nil)
			if err != nil {
				t.Error(err)
				return
			}
			defer conn.Close()
			<-ready
			check(conn, br(), client)
		}))
		defer srv.Close()
		var err error
		client, _, err = websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(srv.URL, "http"), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer client.Close()
		close(ready)
		<-done
	}
	// Two messages in one write; the server reads the first. Its reader is
	// gorilla's buffer exactly when the second waits in it.
	readsThrough := func(t *testing.T, bufSize int) bool {
		var through bool
		upgrade(t, &upgrader, bufSize, func(conn *websocket.Conn, br *bufio.Reader, client *websocket.Conn) {
			msg := append(clientFrame(0x1, []byte("one")), clientFrame(0x1, []byte("two"))...)
			if _, err := client.NetConn().Write(msg); err != nil {
				t.Error(err)
				return
			}
			if _, got, err := conn.ReadMessage(); err != nil || string(got) != "one" {
				t.Errorf("first message %q, %v", got, err)
				return
			}
			through = br.Buffered() == len(clientFrame(0x1, []byte("two")))
		})
		return through
	}
	t.Run("read buffer threshold", func(t *testing.T) {
		if !readsThrough(t, 0) {
			t.Fatalf("gorilla does not read through wsResponse's %d-byte reader: park's Buffered check is blind", wsReadBuffer)
		}
		if readsThrough(t, 256) {
			t.Fatal("gorilla reads through a 256-byte reader: its threshold moved, re-check wsReadBuffer")
		}
		if !readsThrough(t, 257) {
			t.Fatal("gorilla does not read through a 257-byte reader: its threshold moved, re-check wsReadBuffer")
		}
	})
	t.Run("control frame read whole", func(t *testing.T) {
		// The largest control frame a client sends (125 bytes of payload) is
		// read whole through wsReadBuffer: gorilla answers a ping with it.
		upgrade(t, &upgrader, 0, func(conn *websocket.Conn, _ *bufio.Reader, client *websocket.Conn) {
			payload := bytes.Repeat([]byte("p"), 125)
			pong := make(chan string, 1)
			client.SetPongHandler(func(s string) error { pong <- s; return nil })
			if err := client.WriteControl(websocket.PingMessage, payload, time.Now().Add(time.Second)); err != nil {
				t.Error(err)
				return
			}
			go func() { _, _, _ = client.ReadMessage() }()
			go func() { _, _, _ = conn.ReadMessage() }()
			select {
			case got := <-pong:
				if got != string(payload) {
					t.Errorf("pong payload %d bytes, want 125", len(got))
				}
			case <-time.After(5 * time.Second):
				t.Error("no pong for a 125-byte ping through wsReadBuffer")
			}
		})
	})
	t.Run("write buffer pool never drawn", func(t *testing.T) {
		pool := &countingPool{}
		u := upgrader
		u.WriteBufferPool = pool
		upgrade(t, &u, 0, func(conn *websocket.Conn, _ *bufio.Reader, client *websocket.Conn) {
			f := reflect.ValueOf(conn).Elem().FieldByName("writeBuf")
			if !f.IsValid() || f.Kind() != reflect.Slice {
				t.Error("gorilla's Conn has no writeBuf slice: re-check that a WriteBufferPool leaves a connection without a write buffer")
			} else if f.Len() != 0 {
				t.Errorf("the connection holds a %d-byte write buffer", f.Len())
			}
			// Every frame gorilla writes for us: our keep-alive ping, the
			// pong to a client's ping, the close frame.
			got := make(chan string, 2)
			client.SetPingHandler(func(string) error { got <- "ping"; return nil })
			client.SetPongHandler(func(string) error { got <- "pong"; return nil })
			go func() { _, _, _ = client.ReadMessage() }()
			go func() { _, _, _ = conn.ReadMessage() }()
			if err := conn.WriteControl(websocket.PingMessage, nil, time.Now().Add(time.Second)); err != nil {
				t.Error(err)
			}
			if err := client.WriteControl(websocket.PingMessage, []byte("x"), time.Now().Add(time.Second)); err != nil {
				t.Error(err)
			}
			for range 2 {
				select {
				case <-got:
				case <-time.After(5 * time.Second):
					t.Error("a control frame did not arrive")
					return
				}
			}
			msg := websocket.FormatCloseMessage(websocket.CloseNormalClosure, "bye")
			if err := conn.WriteControl(websocket.CloseMessage, msg, time.Now().Add(time.Second)); err != nil {
				t.Error(err)
			}
		})
		if n := pool.gets.Load(); n != 0 {
			t.Fatalf("gorilla drew %d buffers from the write buffer pool", n)
		}
	})
}

// The pins above were checked against gorilla/websocket v1.5.3: a go.mod
// that requires another version fails here until they have been checked
// again.
func TestGorillaVersion(t *testing.T) {
	mod, err := os.ReadFile("../go.mod")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(mod)) {
		f := strings.Fields(line)
		if len(f) >= 2 && f[0] == "github.com/gorilla/websocket" {
			if f[1] != "v1.5.3" {
				t.Fatalf("gorilla/websocket %s: check TestGorillaInternals' pins and idlews.go's list of what it relies on, then update this version", f[1])
			}
			return
		}
	}
	t.Fatal("go.mod does not require gorilla/websocket")
}

// sizedResponse is wsResponse with a reader of any size.
type sizedResponse struct {
	http.ResponseWriter
	size int
	br   *bufio.Reader
}

func (w *sizedResponse) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	conn, brw, err := http.NewResponseController(w.ResponseWriter).Hijack()
	if err != nil {
		return conn, brw, err
	}
	w.br = bufio.NewReaderSize(conn, w.size)
	return conn, bufio.NewReadWriter(w.br, brw.Writer), nil
}

// countingPool is a websocket.BufferPool that counts what is drawn from it.
type countingPool struct {
	gets atomic.Int64
	p    sync.Pool
}

func (p *countingPool) Get() any  { p.gets.Add(1); return p.p.Get() }
func (p *countingPool) Put(v any) { p.p.Put(v) }

// waitFor waits until cond holds, failing after a few seconds.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// BenchmarkWSWriteDeadline: a pong written by sendAll, which arms the write
// deadline only when the socket is full, against the same write with the
// deadline armed before each write (make bench runs it).
func BenchmarkWSWriteDeadline(b *testing.B) {
	var pong, buf [64]byte
	frame := appendTextFrame(buf[:0], realtime.AppendPong(pong[:0], time.Now()))
	for _, c := range []struct {
		name string
		arm  bool
	}{{"when-full", false}, {"every-write", true}} {
		b.Run(c.name, func(b *testing.B) {
			w := newIdleWS(b)
			go func() { _, _ = io.Copy(io.Discard, w.client) }() // the client reads everything
			b.ReportAllocs()
			for b.Loop() {
				if c.arm {
					w.c.w.armDeadline()
				}
				if !w.c.sendAll(frame) {
					b.Fatal("write failed")
				}
			}
		})
	}
}

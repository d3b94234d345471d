package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/gorilla/websocket"
)

// The transports a session can use (PROTOCOL.md, Transports).
const (
	transportWS   = "websocket"
	transportSSE  = "sse"
	transportPoll = "longpoll"
)

// ipBindAddressNoPort (IP_BIND_ADDRESS_NO_PORT) lets the kernel choose the
// local port at connect time, per destination, instead of at bind time: with
// a fixed source address, ports are then not used up by bind alone.
const ipBindAddressNoPort = 24

// bench is the client side of one scenario: the sessions' shared dialers and
// HTTP clients and the counters every session adds to.
type bench struct {
	t       *target
	ctx     context.Context
	dialers []*net.Dialer
	next    atomic.Uint64
	ws      *websocket.Dialer
	streams *http.Client // SSE streams and polls: one connection per session
	posts   *http.Client // SSE pings: up to 128 shared connections
	pingInt time.Duration
	pingTO  time.Duration

	lat      latencies
	received atomic.Int64 // live notifications received, all sessions
	lastRecv atomic.Int64 // unix nanoseconds of the last live notification
	pongs    atomic.Int64
	badMsgs  atomic.Int64 // messages that did not parse
	errMsgs  atomic.Int64 // error messages from the server
	pingErrs atomic.Int64

	mu   sync.Mutex
	byes map[string]int // bye reasons seen
}

// newBench prepares dialers that spread connections over the source
// addresses (127.0.0.2, ...: each has its own ephemeral ports).
func newBench(ctx context.Context, t *target, sources []net.IP, pingInt, pingTO time.Duration) *bench {
	b := &bench{t: t, ctx: ctx, pingInt: pingInt, pingTO: pingTO, byes: map[string]int{}}
	for _, ip := range sources {
		b.dialers = append(b.dialers, &net.Dialer{
			LocalAddr: &net.TCPAddr{IP: ip},
			Timeout:   15 * time.Second,
			Control: func(_, _ string, c syscall.RawConn) error {
				var serr error
				err := c.Control(func(fd uintptr) {
					serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_IP, ipBindAddressNoPort, 1)
				})
				return errors.Join(err, serr)
			},
		})
	}
	if len(b.dialers) == 0 {
		b.dialers = []*net.Dialer{{Timeout: 15 * time.Second}}
	}
	b.ws = &websocket.Dialer{NetDialContext: b.dial, HandshakeTimeout: 15 * time.Second,
		ReadBufferSize: 1024, WriteBufferSize: 512}
	b.streams = &http.Client{Transport: &http.Transport{DialContext: b.dial, MaxIdleConnsPerHost: 1 << 20,
		IdleConnTimeout: 5 * time.Minute, DisableCompression: true, WriteBufferSize: 1024, ReadBufferSize: 2048}}
	b.posts = &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DialContext: b.dial,
		MaxConnsPerHost: 128, MaxIdleConnsPerHost: 128, DisableCompression: true}}
	return b
}

func (b *bench) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	d := b.dialers[b.next.Add(1)%uint64(len(b.dialers))]
	return d.DialContext(ctx, network, addr)
}

func (b *bench) close() {
	b.streams.CloseIdleConnections()
	b.posts.CloseIdleConnections()
}

func (b *bench) sawBye(reason string) {
	b.mu.Lock()
	b.byes[reason]++
	b.mu.Unlock()
}

// message is a server message, as much of it as the tool checks. Data.T is
// the publisher's send time (unix nanoseconds) that every bench notification
// carries.
type message struct {
	Type     string `json:"type"`
	Session  string `json:"session"`
	Seq      int64  `json:"seq"`
	Replayed bool   `json:"replayed"`
	Cursor   int64  `json:"cursor"`
	Reason   string `json:"reason"`
	Code     string `json:"code"`
	Data     struct {
		T int64 `json:"t"`
	} `json:"data"`
}

// session is one client session over one transport. Its counters are checked
// against what was published to its user.
type session struct {
	b      *bench
	idx    int
	user   int // index into the scenario's users
	userID string
	token  string
	tr     string

	mu        sync.Mutex
	id        string
	cursor    int64 // highest seq received
	replayed  int   // replayed notifications on the current connection
	replayBad string
	synced    bool
	live      int64 // live notifications received
	gaps      int64 // seqs skipped by live notifications
	dups      int64 // notifications at or below the cursor
	byeReason string
	byeAt     time.Time
	syncedAt  time.Time
	syncedCh  chan struct{}
	doneCh    chan struct{} // closed when the transport's reader ended
	endErr    error
	timer     *time.Timer

	lastSign atomic.Int64 // unix nanoseconds of the last sign of life sent
	silent   atomic.Bool  // stop every sign of life (eviction test)
	closing  atomic.Bool

	wmu    sync.Mutex
	ws     *websocket.Conn
	cancel context.CancelFunc
}

// handle applies one server message.
func (s *session) handle(data []byte, now time.Time) {
	var m message
	if err := json.Unmarshal(data, &m); err != nil {
		s.b.badMsgs.Add(1)
		return
	}
	switch m.Type {
	case "hello":
		s.mu.Lock()
		s.id = m.Session
		s.mu.Unlock()
	case "notification":
		s.mu.Lock()
		live := false
		switch {
		case m.Replayed && s.synced:
			s.bad("replayed notification after synced")
		case m.Replayed:
			// The bench stores only unread notifications: replay is gapless.
			if m.Seq != s.cursor+1 {
				s.bad(fmt.Sprintf("replay seq %d after %d", m.Seq, s.cursor))
			}
			s.replayed++
		case !s.synced:
			s.bad("live notification before synced")
		case m.Seq <= s.cursor:
			s.dups++
		default:
			s.gaps += m.Seq - s.cursor - 1
			s.live++
			live = true
		}
		s.cursor = max(s.cursor, m.Seq)
		s.mu.Unlock()
		if live {
			s.b.received.Add(1)
			s.b.lastRecv.Store(now.UnixNano())
			if m.Data.T > 0 {
				s.b.lat.add(s.idx, now.Sub(time.Unix(0, m.Data.T)))
			}
		}
	case "synced":
		s.mu.Lock()
		if m.Cursor != s.cursor {
			s.bad(fmt.Sprintf("synced cursor %d, client holds %d", m.Cursor, s.cursor))
		}
		if !s.synced {
			s.synced = true
			s.syncedAt = now
			close(s.syncedCh)
		}
		s.mu.Unlock()
	case "pong":
		s.b.pongs.Add(1)
	case "bye":
		s.mu.Lock()
		s.byeReason, s.byeAt = m.Reason, now
		s.mu.Unlock()
		s.b.sawBye(m.Reason)
	case "error":
		s.b.errMsgs.Add(1)
	}
}

// bad records the first replay or ordering violation (mu held).
func (s *session) bad(why string) {
	if s.replayBad == "" {
		s.replayBad = why
	}
}

// connect opens the session's transport with cursor (and resume, a session
// id to resume) and waits until it is synced.
func (s *session) connect(ctx context.Context, cursor int64, resume string) error {
	s.mu.Lock()
	s.cursor, s.replayed, s.synced, s.replayBad = cursor, 0, false, ""
	s.byeReason, s.id = "", ""
	s.syncedCh, s.doneCh, s.endErr = make(chan struct{}), make(chan struct{}), nil
	synced, done := s.syncedCh, s.doneCh
	s.mu.Unlock()
	s.closing.Store(false)
	s.silent.Store(false)
	q := url.Values{"token": {s.token}}
	if cursor > 0 {
		q.Set("cursor", strconv.FormatInt(cursor, 10))
	}
	if resume != "" {
		q.Set("session", resume)
	}
	var err error
	switch s.tr {
	case transportWS:
		err = s.openWS(ctx, q, done)
	case transportSSE:
		err = s.openSSE(q, done)
	case transportPoll:
		err = s.openPoll(done)
	default:
		err = fmt.Errorf("unknown transport %q", s.tr)
	}
	if err != nil {
		return err
	}
	s.lastSign.Store(time.Now().UnixNano())
	timeout := time.NewTimer(30 * time.Second)
	defer timeout.Stop()
	select {
	case <-synced:
	case <-done:
		s.mu.Lock()
		err, reason := s.endErr, s.byeReason
		s.mu.Unlock()
		return fmt.Errorf("%s ended before synced (bye %q): %v", s.tr, reason, err)
	case <-timeout.C:
		s.close()
		return fmt.Errorf("%s: no synced within 30s", s.tr)
	case <-ctx.Done():
		s.close()
		return ctx.Err()
	}
	if s.tr != transportPoll { // every poll is a heartbeat already
		// The first ping at a random point of the interval spreads them out.
		first := time.Duration(rand.Int64N(int64(s.b.pingInt)))
		s.wmu.Lock()
		s.timer = time.AfterFunc(first, s.ping)
		s.wmu.Unlock()
	}
	return nil
}

// ending records why the transport ended and closes done.
func (s *session) ending(done chan struct{}, err error) {
	s.mu.Lock()
	if s.endErr == nil {
		s.endErr = err
	}
	s.mu.Unlock()
	close(done)
}

var pingMsg = []byte(`{"type":"ping"}`)

// ping sends the client's heartbeat and schedules the next one.
func (s *session) ping() {
	if s.closing.Load() {
		return
	}
	if !s.silent.Load() {
		var err error
		switch s.tr {
		case transportWS:
			s.wmu.Lock()
			if s.ws != nil {
				_ = s.ws.SetWriteDeadline(time.Now().Add(10 * time.Second))
				err = s.ws.WriteMessage(websocket.TextMessage, pingMsg)
			}
			s.wmu.Unlock()
		case transportSSE:
			err = s.postPing()
		}
		if err != nil && !s.closing.Load() {
			s.b.pingErrs.Add(1)
		} else {
			s.lastSign.Store(time.Now().UnixNano())
		}
	}
	s.wmu.Lock()
	if s.timer != nil && !s.closing.Load() {
		s.timer.Reset(s.b.pingInt)
	}
	s.wmu.Unlock()
}

// postPing sends a ping on the SSE upstream and reads the pong it answers.
func (s *session) postPing() error {
	s.mu.Lock()
	id := s.id
	s.mu.Unlock()
	req, err := http.NewRequestWithContext(s.b.ctx, http.MethodPost,
		s.b.t.URL+"/v1/sessions/"+url.PathEscape(id)+"/messages", bytes.NewReader(pingMsg))
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+s.token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := s.b.posts.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var out struct {
		Messages []json.RawMessage `json:"messages"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("ping: status %d", resp.StatusCode)
	}
	now := time.Now()
	for _, m := range out.Messages {
		s.handle(m, now)
	}
	return nil
}

// close ends the session from the client side and waits for its reader.
func (s *session) close() {
	s.closing.Store(true)
	s.wmu.Lock()
	if s.timer != nil {
		s.timer.Stop()
		s.timer = nil
	}
	if s.ws != nil {
		_ = s.ws.WriteControl(websocket.CloseMessage,
			websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""), time.Now().Add(time.Second))
		_ = s.ws.Close()
		s.ws = nil
	}
	if s.cancel != nil {
		s.cancel()
		s.cancel = nil
	}
	s.wmu.Unlock()
	s.mu.Lock()
	done := s.doneCh
	s.mu.Unlock()
	if done != nil {
		select {
		case <-done:
		case <-time.After(10 * time.Second):
		}
	}
}

func (s *session) openWS(ctx context.Context, q url.Values, done chan struct{}) error {
	u := "ws" + strings.TrimPrefix(s.b.t.URL, "http") + "/v1/ws?" + q.Encode()
	conn, resp, err := s.b.ws.DialContext(ctx, u, nil)
	if err != nil {
		if resp != nil {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
			return fmt.Errorf("websocket: status %d: %s", resp.StatusCode, bytes.TrimSpace(body))
		}
		return fmt.Errorf("websocket: %w", err)
	}
	// Answer server pings (a sign of life) unless told to fall silent.
	conn.SetPingHandler(func(data string) error {
		if s.silent.Load() {
			return nil
		}
		s.lastSign.Store(time.Now().UnixNano())
		err := conn.WriteControl(websocket.PongMessage, []byte(data), time.Now().Add(10*time.Second))
		if errors.Is(err, websocket.ErrCloseSent) {
			return nil
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return nil
		}
		return err
	})
	s.wmu.Lock()
	s.ws = conn
	s.wmu.Unlock()
	go func() {
		var err error
		for {
			var data []byte
			_, data, err = conn.ReadMessage()
			if err != nil {
				break
			}
			s.handle(data, time.Now())
		}
		s.ending(done, err)
	}()
	return nil
}

func (s *session) openSSE(q url.Values, done chan struct{}) error {
	ctx, cancel := context.WithCancel(s.b.ctx)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.b.t.URL+"/v1/sse?"+q.Encode(), nil)
	if err != nil {
		cancel()
		return err
	}
	req.Header.Set("Accept", "text/event-stream")
	resp, err := s.b.streams.Do(req)
	if err != nil {
		cancel()
		return fmt.Errorf("sse: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		resp.Body.Close()
		cancel()
		return fmt.Errorf("sse: status %d: %s", resp.StatusCode, bytes.TrimSpace(body))
	}
	s.wmu.Lock()
	s.cancel = cancel
	s.wmu.Unlock()
	go func() {
		defer resp.Body.Close()
		s.ending(done, readEvents(resp.Body, s.handle))
	}()
	return nil
}

// readEvents parses a text/event-stream and hands every event's data (one
// JSON message) to fn; comments (keep-alives), event and id lines are skipped.
func readEvents(r io.Reader, fn func([]byte, time.Time)) error {
	br := bufio.NewReaderSize(r, 2048)
	var data []byte
	for {
		line, err := br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			long := append([]byte(nil), line...)
			for errors.Is(err, bufio.ErrBufferFull) {
				line, err = br.ReadSlice('\n')
				long = append(long, line...)
			}
			line = long
		}
		if err != nil {
			return err
		}
		line = bytes.TrimRight(line, "\r\n")
		switch {
		case len(line) == 0:
			if len(data) > 0 {
				fn(data, time.Now())
				data = data[:0]
			}
		case line[0] == ':':
		case bytes.HasPrefix(line, []byte("data:")):
			v := bytes.TrimPrefix(line[5:], []byte(" "))
			if len(data) > 0 {
				data = append(data, '\n')
			}
			data = append(data, v...)
		}
	}
}

// pollResponse is the body of GET /v1/poll.
type pollResponse struct {
	Session  string            `json:"session"`
	Cursor   int64             `json:"cursor"`
	Messages []json.RawMessage `json:"messages"`
}

func (s *session) openPoll(done chan struct{}) error {
	ctx, cancel := context.WithCancel(s.b.ctx)
	s.wmu.Lock()
	s.cancel = cancel
	s.wmu.Unlock()
	first := make(chan error, 1)
	go func() {
		err := s.pollLoop(ctx, first)
		if ctx.Err() != nil {
			err = nil
		}
		s.ending(done, err)
	}()
	if err := <-first; err != nil {
		cancel()
		<-done
		return err
	}
	return nil
}

// pollLoop polls until ctx ends or the server ends the session; first gets
// the outcome of the first poll.
func (s *session) pollLoop(ctx context.Context, first chan<- error) error {
	polls := 0
	for ctx.Err() == nil {
		for s.silent.Load() && ctx.Err() == nil {
			time.Sleep(100 * time.Millisecond)
		}
		s.mu.Lock()
		id, cur := s.id, s.cursor
		s.mu.Unlock()
		q := url.Values{"token": {s.token}, "wait": {"25"}, "cursor": {strconv.FormatInt(cur, 10)}}
		if id != "" {
			q.Set("session", id)
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.b.t.URL+"/v1/poll?"+q.Encode(), nil)
		if err != nil {
			return err
		}
		s.lastSign.Store(time.Now().UnixNano())
		resp, err := s.b.streams.Do(req)
		if err != nil {
			err = fmt.Errorf("poll: %w", err)
			if polls == 0 {
				first <- err
			}
			return err
		}
		var pr pollResponse
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err == nil && resp.StatusCode != http.StatusOK {
			err = fmt.Errorf("poll: status %d: %s", resp.StatusCode, bytes.TrimSpace(body))
		}
		if err == nil {
			err = json.Unmarshal(body, &pr)
		}
		if err != nil {
			if polls == 0 {
				first <- err
			}
			return err
		}
		s.lastSign.Store(time.Now().UnixNano())
		now := time.Now()
		for _, m := range pr.Messages {
			s.handle(m, now)
		}
		s.mu.Lock()
		if s.id == "" {
			s.id = pr.Session
		}
		ended := s.byeReason != ""
		s.mu.Unlock()
		if polls == 0 {
			first <- nil
		}
		polls++
		if ended {
			return nil
		}
	}
	return ctx.Err()
}

// latencies keeps every publish-to-receive latency of a run, sharded by
// session so that thousands of readers rarely contend.
type latencies struct {
	shards [64]struct {
		mu sync.Mutex
		xs []time.Duration
	}
}

func (l *latencies) add(shard int, d time.Duration) {
	sh := &l.shards[shard%len(l.shards)]
	sh.mu.Lock()
	sh.xs = append(sh.xs, d)
	sh.mu.Unlock()
}

func (l *latencies) reset() {
	for i := range l.shards {
		sh := &l.shards[i]
		sh.mu.Lock()
		sh.xs = nil
		sh.mu.Unlock()
	}
}

func (l *latencies) summary() Percentiles {
	var all []time.Duration
	for i := range l.shards {
		sh := &l.shards[i]
		sh.mu.Lock()
		all = append(all, sh.xs...)
		sh.mu.Unlock()
	}
	return percentiles(all)
}

// Percentiles summarize a set of durations, in milliseconds.
type Percentiles struct {
	N   int     `json:"n"`
	P50 float64 `json:"p50_ms"`
	P95 float64 `json:"p95_ms"`
	P99 float64 `json:"p99_ms"`
	Max float64 `json:"max_ms"`
}

func percentiles(xs []time.Duration) Percentiles {
	if len(xs) == 0 {
		return Percentiles{}
	}
	slices.Sort(xs)
	at := func(q float64) float64 { return ms(xs[int(q*float64(len(xs)-1))]) }
	return Percentiles{N: len(xs), P50: at(.50), P95: at(.95), P99: at(.99), Max: ms(xs[len(xs)-1])}
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

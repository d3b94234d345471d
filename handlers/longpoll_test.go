package handlers

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/notifyd/notifyd/handlers/realtime"
	"github.com/notifyd/notifyd/store"
)

// ackLog is a Recorder that keeps the acknowledgements it takes.
type ackLog struct {
	mu   sync.Mutex
	acks []string
}

func (l *ackLog) Acked(a store.Ack) {
	l.mu.Lock()
	l.acks = append(l.acks, a.NotificationID)
	l.mu.Unlock()
}

func (l *ackLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.acks, " ")
}

// pollFixture is a live long-poll session of a real hub, past its hello and
// synced, with what the hub was told was written.
type pollFixture struct {
	hub  *realtime.Hub
	lp   *longPoll
	acks *ackLog

	mu      sync.Mutex
	written []string
}

func newPollFixture(t *testing.T, queueLimit int) *pollFixture {
	t.Helper()
	f := &pollFixture{acks: &ackLog{}}
	f.hub = realtime.NewHub(realtime.Config{PingInterval: 25 * time.Second, PingTimeout: time.Minute,
		QueueLimit: queueLimit, ByeRetry: time.Second},
		realtime.Hooks{Written: func(_ *realtime.Session, frames []realtime.Frame) {
			f.mu.Lock()
			f.written = append(f.written, describeFrames(frames))
			f.mu.Unlock()
		}})
	s := f.hub.NewSession(realtime.SessionInfo{User: "alice", Device: "d", Transport: realtime.LongPoll}, 0)
	if err := f.hub.Register(s, ""); err != nil {
		t.Fatal(err)
	}
	s.FinishReplay(nil, 0, false)
	f.lp = newLongPoll(f.hub, f.acks, s, 0)
	if got := f.poll(t, 0, 0); got != "hello synced" {
		t.Fatalf("first poll = %q, want hello synced", got)
	}
	f.mu.Lock()
	f.written = nil
	f.mu.Unlock()
	return f
}

// poll runs one exchange that waits up to wait, answered without loss.
func (f *pollFixture) poll(t *testing.T, cursor int64, wait time.Duration) string {
	t.Helper()
	x := f.lp.begin(cursor)
	if x.idle() && wait > 0 {
		x.wait(context.Background(), wait)
	}
	x.finish()
	x.written(false)
	return describeFrames(x.out)
}

func (f *pollFixture) publish(from, to int64) {
	var ns []realtime.Notification
	for seq := from; seq <= to; seq++ {
		ns = append(ns, realtime.Notification{ID: fmt.Sprintf("n%d", seq), User: "alice", Seq: seq,
			Topic: "t", Data: json.RawMessage(`{}`), CreatedAt: time.Now()})
	}
	f.hub.Deliver(ns)
}

func (f *pollFixture) writtenLog() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return strings.Join(f.written, " | ")
}

// describeFrames renders frames as notification seqs, bye:reason, or types.
func describeFrames(frames []realtime.Frame) string {
	parts := make([]string, 0, len(frames))
	for _, fr := range frames {
		switch fr.Type {
		case realtime.TypeNotification:
			parts = append(parts, fmt.Sprint(fr.Seq))
		case realtime.TypeBye:
			var m struct{ Reason string }
			_ = json.Unmarshal(fr.JSON, &m)
			parts = append(parts, "bye:"+m.Reason)
		default:
			parts = append(parts, fr.Type)
		}
	}
	return strings.Join(parts, " ")
}

// A newer poll of a session takes over from one that waits: the older one
// returns at once with nothing, and the newer one gets what comes next.
func TestLongPollNewerPollTakesOver(t *testing.T) {
	f := newPollFixture(t, 64)
	old := f.lp.begin(0)
	if !old.idle() {
		t.Fatalf("nothing queued, but the poll is not idle")
	}
	type result struct {
		ended bool
		out   string
	}
	done := make(chan result, 1)
	go func() {
		old.wait(context.Background(), time.Hour) // returns only when told to
		ended := old.finish()
		done <- result{ended, describeFrames(old.out)}
	}()
	newer := f.lp.begin(0) // returns once the old poll stopped listening
	r := <-done
	if r.ended || r.out != "" {
		t.Fatalf("replaced poll answered ended=%v %q, want nothing", r.ended, r.out)
	}
	if !newer.idle() {
		t.Fatalf("newer poll is not idle")
	}
	if follows, _ := f.lp.follows(0); follows {
		t.Fatalf("a poll follows while another is in charge")
	}
	f.publish(1, 2)
	newer.wait(context.Background(), time.Hour)
	if ended := newer.finish(); ended {
		t.Fatalf("newer poll ended the session")
	}
	newer.written(false)
	if got := describeFrames(newer.out); got != "1 2" {
		t.Fatalf("newer poll = %q, want 1 2", got)
	}
	if follows, owed := f.lp.follows(0); !follows || !owed {
		t.Fatalf("after the answer: follows=%v owed=%v, want both", follows, owed)
	}
	if got := f.writtenLog(); got != "1 2" {
		t.Fatalf("written = %q", got)
	}
	if body := string(newer.body()); !strings.Contains(body, `"cursor":2`) {
		t.Fatalf("body %s does not give cursor 2", body)
	}
}

// A poll that begins while an older one has not yet begun waiting makes the
// older one's exchange empty: it never takes frames.
func TestLongPollOlderPollTakesNothing(t *testing.T) {
	f := newPollFixture(t, 64)
	f.publish(1, 1)
	old := f.lp.begin(0) // takes 1
	newerDone := make(chan *pollExchange, 1)
	go func() { newerDone <- f.lp.begin(0) }()
	// The newer poll waits for the old one to finish; the old one, told to
	// return, sends nothing, and the newer one sends 1 again.
	for {
		f.lp.mu.Lock()
		taken := f.lp.waiter != old.me
		f.lp.mu.Unlock()
		if taken {
			break
		}
		time.Sleep(time.Millisecond)
	}
	if ended := old.finish(); ended || len(old.out) != 0 {
		t.Fatalf("old poll answered %q", describeFrames(old.out))
	}
	old.written(false)
	newer := <-newerDone
	newer.finish()
	newer.written(false)
	if got := describeFrames(newer.out); got != "1" {
		t.Fatalf("newer poll = %q, want 1 (sent again)", got)
	}
}

// Notifications are sent again until a poll's cursor covers them; each is
// recorded as written once and acknowledged once.
func TestLongPollResendsUntilAcknowledged(t *testing.T) {
	f := newPollFixture(t, 64)
	f.publish(1, 2)
	if got := f.poll(t, 0, 0); got != "1 2" {
		t.Fatalf("poll = %q, want 1 2", got)
	}
	// The answer did not reach the client: it polls again from cursor 0.
	if got := f.poll(t, 0, 0); got != "1 2" {
		t.Fatalf("poll after a lost answer = %q, want 1 2 again", got)
	}
	f.publish(3, 3)
	if got := f.poll(t, 1, 0); got != "2 3" {
		t.Fatalf("poll with cursor 1 = %q, want 2 3", got)
	}
	if got := f.acks.String(); got != "n1" {
		t.Fatalf("acknowledged %q, want n1", got)
	}
	x := f.lp.begin(3)
	if !x.idle() {
		t.Fatalf("everything acknowledged, but the poll has %q to send", describeFrames(append(x.resend, x.fresh...)))
	}
	x.finish()
	x.written(false)
	if got := f.acks.String(); got != "n1 n2 n3" {
		t.Fatalf("acknowledged %q, want n1 n2 n3", got)
	}
	if got := f.writtenLog(); got != "1 2 | 3" {
		t.Fatalf("written = %q, want each notification once", got)
	}
	// A cursor behind what was acknowledged is not this session's next poll.
	if follows, _ := f.lp.follows(2); follows {
		t.Fatalf("a poll behind the acknowledged cursor follows")
	}
}

// An answer whose write failed is not recorded as written, and the session's
// next poll is a new connection (it resumes), not a continuation.
func TestLongPollFailedWrite(t *testing.T) {
	f := newPollFixture(t, 64)
	f.publish(1, 1)
	x := f.lp.begin(0)
	x.finish()
	x.written(true)
	if got := f.writtenLog(); got != "" {
		t.Fatalf("written = %q after a failed write", got)
	}
	if follows, owed := f.lp.follows(0); follows || !owed {
		t.Fatalf("after a failed write: follows=%v owed=%v, want false true", follows, owed)
	}
	// Its notifications stay unacknowledged: the state sends them again.
	if got := f.poll(t, 0, 0); got != "1" {
		t.Fatalf("poll after the failed write = %q, want 1", got)
	}
}

// A session that ends between polls owes its bye: the next poll carries its
// last frames and the bye, and only that one.
func TestLongPollByeOwedBetweenPolls(t *testing.T) {
	f := newPollFixture(t, 64)
	f.publish(1, 1)
	if !f.hub.Kick(f.lp.s.ID) {
		t.Fatalf("kick found no session")
	}
	if !f.lp.owesBye() {
		t.Fatalf("kicked session owes no bye")
	}
	x := f.lp.begin(0)
	if ended := x.finish(); !ended {
		t.Fatalf("the poll after the kick did not end the session")
	}
	x.written(false)
	if got := describeFrames(x.out); got != "1 bye:kicked" {
		t.Fatalf("poll after the kick = %q, want 1 bye:kicked", got)
	}
	if f.lp.owesBye() {
		t.Fatalf("bye still owed after an answer carried it")
	}
	if _, owed := f.lp.follows(1); owed {
		t.Fatalf("follows still reports the bye owed")
	}
	if got := f.poll(t, 1, 0); got != "" {
		t.Fatalf("a later poll = %q, want nothing", got)
	}
	if got := f.writtenLog(); got != "1 bye:kicked" {
		t.Fatalf("written = %q", got)
	}
}

// A session that ends while a poll waits ends that poll with the bye.
func TestLongPollByeWhileWaiting(t *testing.T) {
	f := newPollFixture(t, 64)
	x := f.lp.begin(0)
	go f.hub.Kick(f.lp.s.ID)
	x.wait(context.Background(), time.Hour) // returns once the session ends
	if ended := x.finish(); !ended || describeFrames(x.out) != "bye:kicked" {
		t.Fatalf("waiting poll answered ended=%v %q, want bye:kicked", ended, describeFrames(x.out))
	}
}

// A poll whose client left stops waiting and takes nothing: what was queued
// stays for the next poll.
func TestLongPollClientLeaves(t *testing.T) {
	f := newPollFixture(t, 64)
	x := f.lp.begin(0)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	x.wait(ctx, time.Hour)
	x.finish()
	x.written(true)
	if len(x.out) != 0 {
		t.Fatalf("poll of a client that left = %q", describeFrames(x.out))
	}
	f.publish(1, 1)
	if got := f.poll(t, 0, 0); got != "1" {
		t.Fatalf("next poll = %q, want 1", got)
	}
}

// A client that never acknowledges holds at most the queue limit: past it
// the session ends as a slow consumer, and the poll carries that bye.
func TestLongPollUnacknowledgedOverflow(t *testing.T) {
	f := newPollFixture(t, 4)
	f.publish(1, 3)
	if got := f.poll(t, 0, 0); got != "1 2 3" {
		t.Fatalf("poll = %q", got)
	}
	f.publish(4, 5)
	x := f.lp.begin(0)
	if ended := x.finish(); !ended {
		t.Fatalf("five unacknowledged past a limit of four did not end the session")
	}
	if got := describeFrames(x.out); got != "1 2 3 4 5 bye:slow_consumer" {
		t.Fatalf("poll = %q", got)
	}
	if r := f.lp.s.Reason(); r != realtime.ReasonSlowConsumer {
		t.Fatalf("reason %q", r)
	}
}

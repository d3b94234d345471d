package realtime

import (
	"context"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/notifyd/notifyd/store"
)

// Source reads committed notifications: *store.Store.
type Source interface {
	// Fetch returns the notifications in the ranges, ordered by user then seq.
	Fetch(ctx context.Context, ranges []store.SeqRange) ([]store.Notification, error)
	// After returns, per user, up to limit unread notifications above the
	// cursor, ordered by user then seq.
	After(ctx context.Context, cursors map[string]int64, limit int) ([]store.Notification, error)
	// UnreadUpTo returns, per user, the count of unread notifications with
	// seq up to the user's cursor.
	UnreadUpTo(ctx context.Context, cursors map[string]int64) (map[string]int64, error)
}

// Dispatcher turns commit signals (Postgres NOTIFY, parsed by store.Listener
// into seq ranges and handed to Changes) into live deliveries (Hub.Deliver).
// It is the one publish path: a row inserted by the API or by an
// application's own SQL reaches sessions the same way. One goroutine, so
// deliveries keep commit order; signals that pile up while a fetch runs are
// merged into the next fetch.
//
// The rows a publish through this process's store commits are handed to it
// by the store's publish hook (Expect, recent.go), so a signal for them is
// served from memory rather than read back (Source.Fetch).
type Dispatcher struct {
	hub     *Hub
	src     Source
	log     *slog.Logger
	limit   int
	in      chan signal
	held    *signal // an ordered task merge took from in, run next
	catchUp chan struct{}
	recent  recent

	fromMemory, fromDB atomic.Uint64 // notifications dispatched, by where they were read
}

// DispatchStats counts the live notifications dispatched since start, by
// where their rows came from: the memory of this process's own publishes, or
// a read from Postgres (rows inserted by SQL or by another node, or a signal
// that overtook its publish's answer).
type DispatchStats struct {
	FromMemory, FromDB uint64
}

// Stats returns the dispatch counters.
func (d *Dispatcher) Stats() DispatchStats {
	return DispatchStats{FromMemory: d.fromMemory.Load(), FromDB: d.fromDB.Load()}
}

// NewDispatcher returns a dispatcher; limit bounds a catch-up per user and round.
func NewDispatcher(hub *Hub, src Source, log *slog.Logger, limit int) *Dispatcher {
	return &Dispatcher{hub: hub, src: src, log: log, limit: limit,
		in: make(chan signal, 4096), catchUp: make(chan struct{}, 1)}
}

// signal is one item of the dispatcher's queue: a commit's ranges, or a task
// that must run after the deliveries of every commit signalled before it.
type signal struct {
	ranges []store.SeqRange
	task   func(ctx context.Context)
}

// Changes hands over the ranges of one commit signal (the Listener's
// onCommit). It blocks only when thousands of signals are already waiting.
func (d *Dispatcher) Changes(rs []store.SeqRange) { d.in <- signal{ranges: rs} }

// InOrder runs task on the dispatcher's goroutine once every commit signalled
// before it is delivered, and before any signalled after it: a `read` that
// the listener received after a notification reaches sessions after it
// (Control). It blocks as Changes does.
func (d *Dispatcher) InOrder(task func(ctx context.Context)) { d.in <- signal{task: task} }

// CatchUp asks for every online user to be brought up to date from the
// tables: after the listener reconnects, NOTIFYs sent meanwhile are gone.
func (d *Dispatcher) CatchUp() {
	select {
	case d.catchUp <- struct{}{}:
	default:
	}
}

// Run dispatches until ctx ends.
func (d *Dispatcher) Run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-d.catchUp:
			d.runCatchUp(ctx)
		case sig := <-d.in:
			// A catch-up asked for before this signal arrived goes first: the newer rows,
			// delivered first, would move cursors past the rows the catch-up must bring.
			select {
			case <-d.catchUp:
				d.runCatchUp(ctx)
			default:
			}
			d.handle(ctx, sig)
		}
	}
}

// handle runs one signal: its task, or its ranges merged with the range
// signals waiting behind them, up to a task (held by merge and run next).
func (d *Dispatcher) handle(ctx context.Context, sig signal) {
	for {
		if sig.task != nil {
			sig.task(ctx)
		} else {
			d.dispatch(ctx, d.merge(sig.ranges))
		}
		if d.held == nil {
			return
		}
		sig, d.held = *d.held, nil
	}
}

// merge folds rs and every signal already waiting into one range per online
// user.
func (d *Dispatcher) merge(rs []store.SeqRange) []store.SeqRange {
	byUser := make(map[string]store.SeqRange)
	add := func(rs []store.SeqRange) {
		for _, r := range rs {
			if !d.hub.tracker.Online(r.UserID) {
				continue
			}
			if cur, ok := byUser[r.UserID]; ok {
				r.From, r.To = min(r.From, cur.From), max(r.To, cur.To)
			}
			byUser[r.UserID] = r
		}
	}
	add(rs)
	// Stop at a pending catch-up: signals after it must wait until it has run. Stop at
	// a task too (held, run right after these ranges are delivered).
	for more := true; more && len(byUser) < 10000 && len(d.catchUp) == 0; {
		select {
		case sig := <-d.in:
			if sig.task != nil {
				d.held = &sig
				more = false
				break
			}
			add(sig.ranges)
		default:
			more = false
		}
	}
	out := make([]store.SeqRange, 0, len(byUser))
	for _, r := range byUser {
		out = append(out, r)
	}
	return out
}

// dispatch delivers the rows of rs: from memory when this process published
// them (recent), else read from the Source.
func (d *Dispatcher) dispatch(ctx context.Context, rs []store.SeqRange) {
	if len(rs) == 0 {
		return
	}
	found, rs := d.recent.takeOrWait(ctx, rs)
	d.fromMemory.Add(uint64(len(found)))
	if len(rs) == 0 {
		sortByUserSeq(found)
		d.hub.Deliver(found)
		return
	}
	for attempt := 0; ; attempt++ {
		fctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		rows, err := d.src.Fetch(fctx, rs)
		cancel()
		if err == nil {
			ns := fromStoreAll(rows)
			d.fromDB.Add(uint64(len(ns)))
			if len(found) > 0 {
				ns = append(ns, found...)
				sortByUserSeq(ns)
			}
			d.hub.Deliver(ns)
			return
		}
		if ctx.Err() != nil {
			return
		}
		d.log.Warn("dispatch: fetch failed", "err", err, "attempt", attempt)
		if attempt >= 2 {
			// Give up on this signal; a catch-up from the tables covers it.
			d.CatchUp()
			return
		}
		sleep(ctx, time.Duration(attempt+1)*200*time.Millisecond)
	}
}

// runCatchUp delivers what every online user missed, in rounds until no user
// has a full page left.
func (d *Dispatcher) runCatchUp(ctx context.Context) {
	cursors := d.hub.Cursors()
	for len(cursors) > 0 && ctx.Err() == nil {
		fctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		rows, err := d.src.After(fctx, cursors, d.limit)
		cancel()
		if err != nil {
			d.log.Warn("dispatch: catch-up failed; retrying", "err", err)
			sleep(ctx, time.Second)
			continue
		}
		ns := fromStoreAll(rows)
		d.hub.Deliver(ns)
		next := make(map[string]int64)
		count := make(map[string]int)
		for _, n := range ns {
			count[n.User]++
			next[n.User] = max(next[n.User], n.Seq)
		}
		for u, c := range count {
			if c < d.limit {
				delete(next, u)
			}
		}
		cursors = next
	}
	d.sendUnread(ctx)
}

// sendUnread tells the sessions of every online user their unread count, in a
// `read` with no ids, once a catch-up has delivered what they missed: the
// NOTIFY of a read committed while the listener was away reached no one. The
// count covers the rows up to the user's cursor; rows above it come as
// notifications, which a client counts as they arrive.
func (d *Dispatcher) sendUnread(ctx context.Context) {
	cursors := d.hub.Cursors()
	for attempt := 0; len(cursors) > 0 && ctx.Err() == nil; attempt++ {
		fctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		counts, err := d.src.UnreadUpTo(fctx, cursors)
		cancel()
		if err == nil {
			for user, n := range counts {
				d.hub.BroadcastRead(user, nil, n)
			}
			return
		}
		if attempt >= 2 {
			d.log.Warn("dispatch: unread counts after a catch-up failed; the next read carries them", "err", err)
			return
		}
		d.log.Warn("dispatch: unread counts after a catch-up failed; retrying", "err", err)
		sleep(ctx, time.Second)
	}
}

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

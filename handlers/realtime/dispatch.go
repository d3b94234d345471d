package realtime

import (
	"context"
	"log/slog"
	"sync/atomic"
	"time"
)

// Range is a run of seqs of one user, both ends included.
type Range struct {
	User     string
	From, To int64
}

// Source reads committed notifications (the store, in production).
type Source interface {
	// Fetch returns the notifications in the ranges, ordered by user then seq.
	Fetch(ctx context.Context, ranges []Range) ([]Notification, error)
	// After returns, per user, up to limit unread notifications above the
	// cursor, ordered by user then seq.
	After(ctx context.Context, cursors map[string]int64, limit int) ([]Notification, error)
}

// Dispatcher turns commit signals (Postgres NOTIFY, parsed into ranges) into
// live deliveries. It is the one publish path: a row inserted by the API or by
// an application's own SQL reaches sessions the same way. One goroutine, so
// deliveries keep commit order; signals that pile up while a fetch runs are
// merged into the next fetch.
type Dispatcher struct {
	hub     *Hub
	src     Source
	log     *slog.Logger
	limit   int
	in      chan []Range
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
		in: make(chan []Range, 4096), catchUp: make(chan struct{}, 1)}
}

// Changes hands over the ranges of one commit signal. It blocks only when
// thousands of signals are already waiting.
func (d *Dispatcher) Changes(rs []Range) { d.in <- rs }

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
		case rs := <-d.in:
			// A catch-up asked for before this signal arrived goes first: the newer rows,
			// delivered first, would move cursors past the rows the catch-up must bring.
			select {
			case <-d.catchUp:
				d.runCatchUp(ctx)
			default:
			}
			d.dispatch(ctx, d.merge(rs))
		}
	}
}

// merge folds rs and every signal already waiting into one range per online
// user.
func (d *Dispatcher) merge(rs []Range) []Range {
	byUser := make(map[string]Range)
	add := func(rs []Range) {
		for _, r := range rs {
			if !d.hub.tracker.Online(r.User) {
				continue
			}
			if cur, ok := byUser[r.User]; ok {
				r.From, r.To = min(r.From, cur.From), max(r.To, cur.To)
			}
			byUser[r.User] = r
		}
	}
	add(rs)
	// Stop at a pending catch-up: signals after it must wait until it has run.
	for more := true; more && len(byUser) < 10000 && len(d.catchUp) == 0; {
		select {
		case rs := <-d.in:
			add(rs)
		default:
			more = false
		}
	}
	out := make([]Range, 0, len(byUser))
	for _, r := range byUser {
		out = append(out, r)
	}
	return out
}

func (d *Dispatcher) dispatch(ctx context.Context, rs []Range) {
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
		ns, err := d.src.Fetch(fctx, rs)
		cancel()
		if err == nil {
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
		ns, err := d.src.After(fctx, cursors, d.limit)
		cancel()
		if err != nil {
			d.log.Warn("dispatch: catch-up failed; retrying", "err", err)
			sleep(ctx, time.Second)
			continue
		}
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
}

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

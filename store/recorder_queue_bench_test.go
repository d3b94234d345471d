package store

import (
	"strconv"
	"sync"
	"testing"
	"time"
)

// BenchmarkRecorderQueue compares the Recorder's queue, which holds each
// record boxed in one slice (boxed), with a typed slice per kind and a list
// of kinds in arrival order (typed, typedQueue), which boxes nothing. One op
// queues a flush's worth of records (10,000: 80% deliveries, 10% acks, 5%
// session starts and 5% ends) through the recording methods, takes them off
// as flushAll does and reads each kind's records in arrival order, as build
// does (each record's id is looked at).
func BenchmarkRecorderQueue(b *testing.B) {
	const batch = 10_000
	recs := benchRecords(batch)
	opt := RecorderOptions{Buffer: 2 * batch, MaxBatch: 2 * batch}
	b.Run("boxed", func(b *testing.B) {
		r := NewRecorder(nil, nil, opt)
		b.ReportAllocs()
		for b.Loop() {
			for _, rec := range recs {
				switch v := rec.(type) {
				case Delivery:
					r.Delivered(v)
				case Ack:
					r.Acked(v)
				case SessionStart:
					r.SessionStarted(v)
				case SessionEnd:
					r.SessionEnded(v)
				}
			}
			r.mu.Lock()
			n := min(r.opt.MaxBatch, len(r.q))
			chunk := r.q[:n:n]
			r.q, r.qAcks = nil, 0
			r.mu.Unlock()
			if got := consumeBoxed(chunk); got != batch {
				b.Fatalf("%d records taken, want %d", got, batch)
			}
		}
		b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*batch), "ns/record")
	})
	b.Run("typed", func(b *testing.B) {
		q := &typedQueue{opt: opt}
		b.ReportAllocs()
		for b.Loop() {
			for _, rec := range recs {
				switch v := rec.(type) {
				case Delivery:
					q.Delivered(v)
				case Ack:
					q.Acked(v)
				case SessionStart:
					q.SessionStarted(v)
				case SessionEnd:
					q.SessionEnded(v)
				}
			}
			q.mu.Lock()
			chunk := q.q.popFront(q.opt.MaxBatch)
			q.q = typedRecords{}
			q.mu.Unlock()
			if got := chunk.consume(); got != batch {
				b.Fatalf("%d records taken, want %d", got, batch)
			}
		}
		b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*batch), "ns/record")
	})
}

// benchRecords is n records of every kind in a busy node's proportions.
func benchRecords(n int) []any {
	recs := make([]any, n)
	for i := range recs {
		sid := "session-" + strconv.Itoa(i%500)
		switch i % 20 {
		case 0:
			recs[i] = SessionStart{RowID: "0190c2a0-0000-7000-8000-000000000001", SessionID: sid, UserID: "user", Device: "d", Transport: "ws"}
		case 1:
			recs[i] = SessionEnd{RowID: "0190c2a0-0000-7000-8000-000000000001", LastSeen: time.Now(), Reason: "client_close"}
		case 2, 3:
			recs[i] = Ack{NotificationID: "0190c2a0-0000-7000-8000-000000000002", SessionID: sid}
		default:
			recs[i] = Delivery{NotificationID: "0190c2a0-0000-7000-8000-000000000002", UserID: "user", Seq: int64(i),
				SessionID: sid, Device: "d", Transport: "ws", PublishedAt: time.Now()}
		}
	}
	return recs
}

// consumeBoxed reads a chunk kind by kind, a pass per kind, as build does,
// and counts the records.
func consumeBoxed(chunk []any) int {
	var got int
	for _, rec := range chunk {
		if s, ok := rec.(SessionStart); ok {
			if s.RowID != "" {
				got++
			}
		}
	}
	for _, rec := range chunk {
		if d, ok := rec.(Delivery); ok {
			if d.NotificationID != "" {
				got++
			}
		}
	}
	for _, rec := range chunk {
		if a, ok := rec.(Ack); ok {
			if a.NotificationID != "" {
				got++
			}
		}
	}
	for _, rec := range chunk {
		if e, ok := rec.(SessionEnd); ok {
			if e.RowID != "" {
				got++
			}
		}
	}
	return got
}

// typedQueue is the Recorder's queue with a typed slice per kind instead of
// boxed records: what BenchmarkRecorderQueue compares it with.
type typedQueue struct {
	opt  RecorderOptions
	mu   sync.Mutex
	q    typedRecords
	wake chan struct{}
}

type recKind uint8

const (
	kindDelivery recKind = iota
	kindAck
	kindStart
	kindEnd
)

// typedRecords is a FIFO of records: order holds the kinds in arrival order,
// the typed slices the records of each kind in arrival order.
type typedRecords struct {
	order  []recKind
	deliv  []Delivery
	acks   []Ack
	starts []SessionStart
	ends   []SessionEnd
}

func (q *typedQueue) Delivered(d Delivery) {
	if d.At.IsZero() {
		d.At = time.Now()
	}
	q.enqueue(kindDelivery, func(q *typedRecords) { q.deliv = append(q.deliv, d) })
}

func (q *typedQueue) Acked(a Ack) {
	if a.At.IsZero() {
		a.At = time.Now()
	}
	q.enqueue(kindAck, func(q *typedRecords) { q.acks = append(q.acks, a) })
}

func (q *typedQueue) SessionStarted(s SessionStart) {
	if s.ConnectedAt.IsZero() {
		s.ConnectedAt = time.Now()
	}
	q.enqueue(kindStart, func(q *typedRecords) { q.starts = append(q.starts, s) })
}

func (q *typedQueue) SessionEnded(e SessionEnd) {
	if e.EndedAt.IsZero() {
		e.EndedAt = time.Now()
	}
	q.enqueue(kindEnd, func(q *typedRecords) { q.ends = append(q.ends, e) })
}

func (q *typedQueue) enqueue(k recKind, add func(*typedRecords)) {
	q.mu.Lock()
	if len(q.q.order) >= q.opt.Buffer {
		q.mu.Unlock()
		return
	}
	q.q.order = append(q.q.order, k)
	add(&q.q)
	n := len(q.q.order)
	q.mu.Unlock()
	if n >= q.opt.MaxBatch {
		select {
		case q.wake <- struct{}{}:
		default:
		}
	}
}

// popFront removes and returns the first n records (all if fewer).
func (q *typedRecords) popFront(n int) typedRecords {
	n = min(n, len(q.order))
	var cnt [4]int
	for _, k := range q.order[:n] {
		cnt[k]++
	}
	head := typedRecords{
		order:  q.order[:n:n],
		deliv:  q.deliv[:cnt[kindDelivery]:cnt[kindDelivery]],
		acks:   q.acks[:cnt[kindAck]:cnt[kindAck]],
		starts: q.starts[:cnt[kindStart]:cnt[kindStart]],
		ends:   q.ends[:cnt[kindEnd]:cnt[kindEnd]],
	}
	q.order = q.order[n:]
	q.deliv = q.deliv[cnt[kindDelivery]:]
	q.acks = q.acks[cnt[kindAck]:]
	q.starts = q.starts[cnt[kindStart]:]
	q.ends = q.ends[cnt[kindEnd]:]
	return head
}

// consume reads the records kind by kind, as build does, and counts them.
func (q typedRecords) consume() int {
	var n int
	for _, s := range q.starts {
		if s.RowID != "" {
			n++
		}
	}
	for _, d := range q.deliv {
		if d.NotificationID != "" {
			n++
		}
	}
	for _, a := range q.acks {
		if a.NotificationID != "" {
			n++
		}
	}
	for _, e := range q.ends {
		if e.RowID != "" {
			n++
		}
	}
	return n
}

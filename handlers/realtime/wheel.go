package realtime

import (
	"sync"
	"time"
)

// wheel is the heartbeat deadline wheel. Time is cut into slots of a fixed
// width; a session sits in the slot of its deadline (last sign of life plus the
// ping timeout, rounded up), on an intrusive doubly linked list, so scheduling,
// moving and removing a session are O(1) and a sweep touches only the slots
// that have come due: its cost grows with the sessions that expire, not with
// all sessions.
type wheel struct {
	mu    sync.Mutex
	width int64 // slot width in nanoseconds
	slots map[int64]*Session
	next  int64 // the lowest slot not yet swept
}

func newWheel(width time.Duration, now time.Time) *wheel {
	w := &wheel{width: int64(width), slots: make(map[int64]*Session)}
	w.next = w.slotOf(now.UnixNano())
	return w
}

// Slot numbers are positive (deadlines are after 1970); a session's slot is 0
// while it is not in the wheel.

// slotOf is the slot a deadline falls in: the first slot whose start is at or
// after it, so a session is never swept before its deadline.
func (w *wheel) slotOf(deadline int64) int64 {
	return (deadline + w.width - 1) / w.width
}

// schedule puts s in the slot of deadline (unix nanoseconds). A pinned session
// stays out of the wheel.
func (w *wheel) schedule(s *Session, deadline int64) {
	slot := w.slotOf(deadline)
	if s.slot.Load() == slot {
		return
	}
	if s.pins > 0 {
		return
	}
	w.unlink(s)
	head := w.slots[slot]
	s.prev, s.next = nil, head
	if head != nil {
		head.prev = s
	}
	w.slots[slot] = s
	s.slot.Store(slot)
}

// unlink takes s out of its slot, if it is in one.
func (w *wheel) unlink(s *Session) {
	slot := s.slot.Load()
	if slot == 0 {
		return
	}
	if s.prev != nil {
		s.prev.next = s.next
	} else if s.next != nil {
		w.slots[slot] = s.next
	} else {
		delete(w.slots, slot)
	}
	if s.next != nil {
		s.next.prev = s.prev
	}
	s.prev, s.next = nil, nil
	s.slot.Store(0)
}

// expire removes and returns every session whose slot started at or before now.
func (w *wheel) expire(now int64, dst []*Session) []*Session {
	last := now / w.width
	w.mu.Lock()
	defer w.mu.Unlock()
	if last < w.next {
		return dst
	}
	take := func(slot int64) {
		for s := w.slots[slot]; s != nil; {
			nxt := s.next
			s.prev, s.next = nil, nil
			s.slot.Store(0)
			dst = append(dst, s)
			s = nxt
		}
		delete(w.slots, slot)
	}
	if span := last - w.next + 1; span <= int64(len(w.slots))+64 {
		for slot := w.next; slot <= last; slot++ {
			if w.slots[slot] != nil {
				take(slot)
			}
		}
	} else {
		// A long pause between sweeps: walking the occupied slots is cheaper
		// than walking every slot of the gap.
		for slot := range w.slots {
			if slot <= last {
				take(slot)
			}
		}
	}
	w.next = last + 1
	return dst
}

// len counts the sessions in the wheel (tests only: it walks every list).
func (w *wheel) len() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := 0
	for _, s := range w.slots {
		for ; s != nil; s = s.next {
			n++
		}
	}
	return n
}

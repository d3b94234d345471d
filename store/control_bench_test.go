package store_test

import (
	"fmt"
	"strings"
	"testing"

	"github.com/notifyd/notifyd/store"
	"github.com/notifyd/notifyd/store/storetest"
)

// BenchmarkMarkReadTrigger: the cost the read trigger (migration 007) adds
// to a read: MarkRead of one id per op, for a user with 1,000 unread rows
// (refilled as they run out), with the trigger and with it dropped.
func BenchmarkMarkReadTrigger(b *testing.B) {
	for _, withTrigger := range []bool{true, false} {
		b.Run(fmt.Sprintf("trigger=%t", withTrigger), func(b *testing.B) {
			s := storetest.New(b)
			ctx := testCtx(b)
			if !withTrigger {
				if _, err := s.Pool().Exec(ctx, `DROP TRIGGER notifications_read_notify ON notifications`); err != nil {
					b.Fatal(err)
				}
			}
			var ids []string
			refill := func() {
				batch := make([]store.NewNotification, 1000)
				for i := range batch {
					batch[i] = note("reader")
				}
				for _, p := range mustPublish(b, s, batch...) {
					ids = append(ids, p.ID)
				}
			}
			b.ResetTimer()
			for b.Loop() {
				if len(ids) == 0 {
					b.StopTimer()
					refill()
					b.StartTimer()
				}
				if _, _, err := s.MarkRead(ctx, "reader", ids[:1], 0); err != nil {
					b.Fatal(err)
				}
				ids = ids[1:]
			}
		})
	}
}

// BenchmarkParseControl: parsing a full payload of read lines (the listener
// parses every control NOTIFY of the cluster).
func BenchmarkParseControl(b *testing.B) {
	var msgs []store.ControlMessage
	for i := range 50 {
		msgs = append(msgs, store.ControlMessage{Kind: store.ControlRead, User: fmt.Sprintf("user-%d", i), Unread: 12,
			IDs: []string{"01a23740-f808-7299-935d-c2012aa5d944", "01a23740-f808-7299-935d-c2012aa5d945", "01a23740-f808-7299-935d-c2012aa5d946"}})
	}
	p := store.FormatControl(msgs)[0]
	b.SetBytes(int64(len(p)))
	b.ReportAllocs()
	for b.Loop() {
		ms, err := store.ParseControl(p)
		if err != nil || len(ms) != len(msgs) {
			b.Fatal(len(ms), err, strings.Count(p, "\n"))
		}
	}
}

package store_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/notifyd/notifyd/store"
	"github.com/notifyd/notifyd/store/storetest"
)

// TestRefusedDataIsInvalid: data that passes Go's checks but that Postgres
// refuses (SQLSTATE class 22) is an EINVALID error matching ErrInvalid, with
// a message in Postgres's words and no SQLSTATE or Go type in it, through
// both Publish and PublishOne.
func TestRefusedDataIsInvalid(t *testing.T) {
	s := storetest.New(t)
	ctx := testCtx(t)
	number := note("u")
	number.Data = []byte(`{"x":1e1000000}`)
	surrogate := note("u")
	surrogate.Data = []byte(`["\ud800"]`)
	nulKey := note("u")
	nulKey.IdempotencyKey = "a\x00b"
	for name, n := range map[string]store.NewNotification{"number": number, "surrogate": surrogate, "NUL key": nulKey} {
		_, err1 := s.Publish(ctx, []store.NewNotification{note("v"), n})
		_, err2 := s.PublishOne(ctx, n)
		for _, err := range []error{err1, err2} {
			if store.ErrorCode(err) != store.EINVALID || !errors.Is(err, store.ErrInvalid) {
				t.Errorf("%s: %v (code %q), want EINVALID", name, err, store.ErrorCode(err))
			}
			msg := store.ErrorMessage(err)
			if !strings.HasPrefix(msg, "the database rejected the data: ") || strings.Contains(msg, "SQLSTATE") {
				t.Errorf("%s: message %q", name, msg)
			}
		}
	}
}

// TestErrorCodes: a publish to a closed store is ESHUTTINGDOWN, a statement on
// a closed pool or past its context EUNAVAILABLE (the context's error still matches),
// validation EINVALID with its own message, and an error with no code
// EINTERNAL with a message that hides it.
func TestErrorCodes(t *testing.T) {
	s := storetest.New(t)
	ctx := testCtx(t)
	if _, err := s.Publish(ctx, []store.NewNotification{{UserID: "u"}}); store.ErrorCode(err) != store.EINVALID ||
		store.ErrorMessage(err) != "notification 0: empty topic" {
		t.Errorf("no topic: %v, message %q", err, store.ErrorMessage(err))
	}
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := s.Publish(cancelled, []store.NewNotification{note("u")}); store.ErrorCode(err) != store.EUNAVAILABLE || !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled: %v (code %q), want EUNAVAILABLE matching context.Canceled", err, store.ErrorCode(err))
	}
	s.Close()
	if _, err := s.PublishOne(ctx, note("u")); store.ErrorCode(err) != store.ESHUTTINGDOWN {
		t.Errorf("PublishOne after Close: %v, want ESHUTTINGDOWN", err)
	}
	if _, err := s.Publish(ctx, []store.NewNotification{note("u")}); store.ErrorCode(err) != store.ESHUTTINGDOWN {
		t.Errorf("Publish after Close: %v, want ESHUTTINGDOWN", err)
	}
	if _, _, err := s.MarkRead(ctx, "u", nil, 1); store.ErrorCode(err) != store.EUNAVAILABLE ||
		store.ErrorMessage(err) != "the database is unavailable; retry later" {
		t.Errorf("MarkRead on a closed pool: %v (code %q), want EUNAVAILABLE", err, store.ErrorCode(err))
	}
	plain := errors.New("secret detail")
	if store.ErrorCode(plain) != store.EINTERNAL || store.ErrorMessage(plain) != "internal error" {
		t.Errorf("plain error: %q %q", store.ErrorCode(plain), store.ErrorMessage(plain))
	}
	if store.ErrorCode(nil) != "" {
		t.Errorf("ErrorCode(nil) = %q", store.ErrorCode(nil))
	}
}

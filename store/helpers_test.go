package store_test

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/notifyd/notifyd/store"
)

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func testLog() *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// listening runs a Listener until the test ends and collects what it reports.
type listening struct {
	l          *store.Listener
	mu         sync.Mutex
	changes    []store.SeqRange
	reconnects int
	notify     chan struct{} // pinged on every callback
	done       chan struct{}
}

func startListener(t *testing.T, s *store.Store, tune func(*store.Listener)) *listening {
	t.Helper()
	lst := &listening{l: s.NewListener(testLog()), notify: make(chan struct{}, 1), done: make(chan struct{})}
	lst.l.AppName = fmt.Sprintf("notifyd-test-%d", time.Now().UnixNano())
	if tune != nil {
		tune(lst.l)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	go func() {
		defer close(lst.done)
		err := lst.l.Run(ctx, func() { close(ready) }, func(cs []store.SeqRange) {
			lst.mu.Lock()
			lst.changes = append(lst.changes, cs...)
			lst.mu.Unlock()
			lst.ping()
		}, func() {
			lst.mu.Lock()
			lst.reconnects++
			lst.mu.Unlock()
			lst.ping()
		})
		if err != nil {
			t.Errorf("listener Run: %v", err)
		}
	}()
	t.Cleanup(func() { cancel(); <-lst.done })
	select {
	case <-ready:
	case <-time.After(30 * time.Second):
		t.Fatal("listener not ready")
	}
	return lst
}

func (l *listening) ping() {
	select {
	case l.notify <- struct{}{}:
	default:
	}
}

// waitFor waits until cond (called under the lock) holds.
func (l *listening) waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.After(30 * time.Second)
	for {
		l.mu.Lock()
		ok := cond()
		l.mu.Unlock()
		if ok {
			return
		}
		select {
		case <-l.notify:
		case <-time.After(50 * time.Millisecond):
		case <-deadline:
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// covered returns, per user, the highest seq up to which every seq was reported.
func (l *listening) covered() map[string]int64 {
	hi := map[string]int64{}
	for _, c := range l.changes {
		if c.From == hi[c.UserID]+1 {
			hi[c.UserID] = c.To
		}
	}
	return hi
}

func mustPublish(t testing.TB, s *store.Store, ns ...store.NewNotification) []store.Published {
	t.Helper()
	ps, err := s.Publish(testCtx(t), ns)
	if err != nil {
		t.Fatalf("publish: %v", err)
	}
	return ps
}

func note(user string) store.NewNotification {
	return store.NewNotification{UserID: user, Topic: "test.topic", Data: []byte(`{"n":1}`)}
}

// connect opens a plain connection on the store's settings (another "application").
func connect(t testing.TB, s *store.Store) *pgx.Conn {
	t.Helper()
	conn, err := pgx.ConnectConfig(testCtx(t), s.Pool().Config().ConnConfig.Copy())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

package store

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"time"

	"github.com/cenkalti/backoff/v5"
	"github.com/jackc/pgx/v5"
)

// ListenerAppName is the application_name of the Listener's connection (to find its backend).
const ListenerAppName = "notifyd-listener"

// ChannelPrefix is the NOTIFY channel prefix; the channel is ChannelPrefix + the schema name.
const ChannelPrefix = "notifyd:"

// Listener receives the NOTIFYs sent by the notifications trigger, on a dedicated connection.
type Listener struct {
	s   *Store
	log *slog.Logger

	// HealthInterval is how long Run waits for a notification before pinging the
	// connection to detect silent loss. Set before Run; default 15s.
	HealthInterval time.Duration
	// PingTimeout bounds that ping. Default 5s.
	PingTimeout time.Duration
	// AppName is the application_name of the connection (set before Run), to find its
	// backend in pg_stat_activity. Default ListenerAppName.
	AppName string
	// OnControl, when set before Run, receives the parsed payloads of the control
	// channel (ControlChannelPrefix + schema, store/control.go), from Run's goroutine,
	// in arrival order with the commits.
	OnControl func([]ControlMessage)
}

// NewListener returns a Listener using the store's connection settings. log may be nil.
func (s *Store) NewListener(log *slog.Logger) *Listener {
	if log == nil {
		log = slog.Default()
	}
	return &Listener{s: s, log: log, HealthInterval: 15 * time.Second, PingTimeout: 5 * time.Second, AppName: ListenerAppName}
}

// Run listens until ctx ends, then returns nil. It calls onReady once, when the first LISTEN is
// active; onCommit for every NOTIFY (its payload parsed into the committed seq ranges), in
// arrival order, from this goroutine;
// and onReconnect after every later (re)connect, once LISTEN is active again, so the caller can
// catch up from the tables (NOTIFYs sent while disconnected are lost). A dead connection is
// detected by the error of the wait or, when nothing arrives for HealthInterval, by a ping.
// Reconnects use exponential backoff without a time limit. Any callback may be nil.
func (l *Listener) Run(ctx context.Context, onReady func(), onCommit func([]SeqRange), onReconnect func()) error {
	bo := backoff.NewExponentialBackOff()
	bo.InitialInterval = 100 * time.Millisecond
	bo.MaxInterval = 5 * time.Second
	connected := false
	for {
		conn, err := l.connect(ctx)
		if err == nil {
			bo.Reset()
			if !connected {
				connected = true
				if onReady != nil {
					onReady()
				}
			} else {
				l.log.Info("store listener reconnected")
				if onReconnect != nil {
					onReconnect()
				}
			}
			err = l.listen(ctx, conn, onCommit)
			closeCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
			_ = conn.Close(closeCtx)
			cancel()
		}
		if ctx.Err() != nil {
			return nil
		}
		wait := bo.NextBackOff()
		l.log.Warn("store listener disconnected", "err", err, "retry_in", wait)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
	}
}

// connect opens a dedicated connection (not from the pool) and LISTENs on the channel of its
// current schema, and on its control channel when OnControl is set.
func (l *Listener) connect(ctx context.Context) (*pgx.Conn, error) {
	cfg := l.s.pool.Config().ConnConfig.Copy()
	cfg.RuntimeParams["application_name"] = l.AppName
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("store listener: connect: %w", err)
	}
	var schema string
	err = conn.QueryRow(ctx, "SELECT current_schema()").Scan(&schema)
	if err == nil {
		// One statement text for both channels: the connection's last query names them.
		sql := "LISTEN " + pgx.Identifier{ChannelPrefix + schema}.Sanitize()
		if l.OnControl != nil {
			sql += "; LISTEN " + pgx.Identifier{ControlChannelPrefix + schema}.Sanitize()
		}
		_, err = conn.Exec(ctx, sql)
	}
	if err != nil {
		_ = conn.Close(context.WithoutCancel(ctx))
		return nil, fmt.Errorf("store listener: listen: %w", err)
	}
	return conn, nil
}

// listen delivers notifications until the connection fails or ctx ends.
func (l *Listener) listen(ctx context.Context, conn *pgx.Conn, onCommit func([]SeqRange)) error {
	for {
		wctx, cancel := context.WithTimeout(ctx, l.HealthInterval)
		n, err := conn.WaitForNotification(wctx)
		cancel()
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if errors.Is(err, context.DeadlineExceeded) {
			// Quiet for a while: make sure the connection is still alive.
			pctx, cancel := context.WithTimeout(ctx, l.PingTimeout)
			err = conn.Ping(pctx)
			cancel()
			if err != nil {
				return fmt.Errorf("store listener: ping: %w", err)
			}
			continue
		}
		if err != nil {
			return fmt.Errorf("store listener: wait: %w", err)
		}
		if strings.HasPrefix(n.Channel, ControlChannelPrefix) {
			msgs, perr := ParseControl(n.Payload)
			if perr != nil {
				l.log.Warn("store listener: bad control lines skipped", "err", perr)
			}
			if len(msgs) > 0 {
				l.OnControl(msgs)
			}
			continue
		}
		ranges, perr := ParsePayload(n.Payload)
		if perr != nil {
			l.log.Warn("store listener: bad payload lines skipped", "err", perr)
		}
		if len(ranges) > 0 && onCommit != nil {
			onCommit(ranges)
		}
	}
}

// ParsePayload parses a NOTIFY payload of the notifications trigger: lines
// "user_id<TAB>from<TAB>to" separated by newlines (a user id may itself contain tabs; the two
// numbers are taken from the end of the line), each the range of seqs one commit gave a user.
// Empty lines are skipped. It returns every well-formed range, and an error naming the malformed lines if there were any.
func ParsePayload(p string) ([]SeqRange, error) {
	return parseLines(p, "payload", parseLine)
}

// parseLines parses the newline-separated lines of a NOTIFY payload with
// parse, skipping empty ones. It returns every well-formed line's value, and
// an error naming the malformed lines (what names the payload) if there were
// any.
func parseLines[T any](p, what string, parse func(string) (T, error)) ([]T, error) {
	var out []T
	var errs []error
	for i, line := range strings.Split(p, "\n") {
		if line == "" {
			continue
		}
		v, err := parse(line)
		if err != nil {
			errs = append(errs, fmt.Errorf("line %d: %w", i+1, err))
			continue
		}
		out = append(out, v)
	}
	if len(errs) > 0 {
		return out, fmt.Errorf("store: parse %s: %w", what, errors.Join(errs...))
	}
	return out, nil
}

func parseLine(line string) (SeqRange, error) {
	t2 := strings.LastIndexByte(line, '\t')
	if t2 < 0 {
		return SeqRange{}, errors.New("want user<TAB>from<TAB>to")
	}
	t1 := strings.LastIndexByte(line[:t2], '\t')
	if t1 <= 0 {
		return SeqRange{}, errors.New("want user<TAB>from<TAB>to")
	}
	from, err := strconv.ParseInt(line[t1+1:t2], 10, 64)
	if err != nil {
		return SeqRange{}, fmt.Errorf("from: %w", err)
	}
	to, err := strconv.ParseInt(line[t2+1:], 10, 64)
	if err != nil {
		return SeqRange{}, fmt.Errorf("to: %w", err)
	}
	if from < 1 || to < from {
		return SeqRange{}, fmt.Errorf("bad range %d..%d", from, to)
	}
	return SeqRange{UserID: line[:t1], From: from, To: to}, nil
}

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

// MovesChannelPrefix is the prefix of the channel on which the nodes pass
// long-poll sessions to each other; the channel is MovesChannelPrefix + the
// schema name. A payload is one message (Move), one of the lines
//
//	moved<TAB>session<TAB>to<TAB>cursor<TAB>user
//	end<TAB>session<TAB>reason<TAB>user
//
// moved: the client of session (of user) polls another node now, as session
// to, and holds everything up to cursor; the node holding session drops its
// copy without a bye. end: the node holding session (an adopted one) ends it
// for reason, which the session it was adopted from had ended with before
// its bye reached the client (kicked, heartbeat_timeout, ...).
const MovesChannelPrefix = "notifyd-moved:"

// MovesAppName is the application_name of the connection that listens for moves.
const MovesAppName = "notifyd-moves"

// MoveKind is the type of a Move.
type MoveKind uint8

// The kinds of Move.
const (
	MoveMoved MoveKind = iota + 1 // Session moved to To
	MoveEnd                       // end Session for Reason
)

// Move is one message of the moves channel.
type Move struct {
	Kind    MoveKind
	Session string
	User    string
	To      string // MoveMoved: the session id on the adopting node
	Cursor  int64  // MoveMoved: the client holds everything up to it
	Reason  string // MoveEnd
}

// payload is m's wire form. Session ids and reasons hold no tab or newline
// (the hub's ids are base64url); the user, which may hold tabs, comes last.
func (m Move) payload() string {
	if m.Kind == MoveEnd {
		return "end\t" + m.Session + "\t" + m.Reason + "\t" + m.User
	}
	return "moved\t" + m.Session + "\t" + m.To + "\t" + strconv.FormatInt(m.Cursor, 10) + "\t" + m.User
}

// ParseMove parses a payload of the moves channel.
func ParseMove(p string) (Move, error) {
	typ, rest, _ := strings.Cut(p, "\t")
	switch typ {
	case "moved":
		f := strings.SplitN(rest, "\t", 4)
		if len(f) != 4 || f[0] == "" || f[1] == "" {
			break
		}
		c, err := strconv.ParseInt(f[2], 10, 64)
		if err != nil || c < 0 {
			break
		}
		return Move{Kind: MoveMoved, Session: f[0], To: f[1], Cursor: c, User: f[3]}, nil
	case "end":
		f := strings.SplitN(rest, "\t", 3)
		if len(f) != 3 || f[0] == "" || f[1] == "" {
			break
		}
		return Move{Kind: MoveEnd, Session: f[0], Reason: f[1], User: f[2]}, nil
	}
	return Move{}, fmt.Errorf("store: move %.60q: want moved<TAB>session<TAB>to<TAB>cursor<TAB>user or end<TAB>session<TAB>reason<TAB>user", p)
}

// SendMove sends m to every node. Only the node that holds m.Session acts;
// the rest ignore it.
func (s *Store) SendMove(ctx context.Context, m Move) error {
	if strings.ContainsAny(m.Session+m.To+m.Reason, "\t\n") || strings.Contains(m.User, "\n") {
		return fmt.Errorf("store: send move: session or user holds a separator")
	}
	if _, err := s.pool.Exec(ctx, `SELECT pg_notify($1 || current_schema(), $2)`, MovesChannelPrefix, m.payload()); err != nil {
		return DBError("send move", err)
	}
	return nil
}

// ListenMoves calls onMove, from one goroutine in arrival order, for every
// move another node sends, until ctx ends. It holds a dedicated connection and
// reconnects with backoff; a move sent while it is disconnected is lost, and
// then the session it names ends on this node at its heartbeat timeout instead.
func (s *Store) ListenMoves(ctx context.Context, log *slog.Logger, onMove func(Move)) {
	bo := backoff.NewExponentialBackOff()
	bo.InitialInterval = 100 * time.Millisecond
	bo.MaxInterval = 5 * time.Second
	for {
		err := s.listenMoves(ctx, log, onMove, bo.Reset)
		if ctx.Err() != nil {
			return
		}
		wait := bo.NextBackOff()
		log.Warn("moves listener disconnected", "err", err, "retry_in", wait)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// listenMoves runs one connection of ListenMoves; connected runs once LISTEN is active.
func (s *Store) listenMoves(ctx context.Context, log *slog.Logger, onMove func(Move), connected func()) error {
	cfg := s.pool.Config().ConnConfig.Copy()
	cfg.RuntimeParams["application_name"] = MovesAppName
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return fmt.Errorf("moves listener: connect: %w", err)
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
		_ = conn.Close(cctx)
		cancel()
	}()
	var schema string
	if err := conn.QueryRow(ctx, "SELECT current_schema()").Scan(&schema); err != nil {
		return fmt.Errorf("moves listener: schema: %w", err)
	}
	if _, err := conn.Exec(ctx, "LISTEN "+pgx.Identifier{MovesChannelPrefix + schema}.Sanitize()); err != nil {
		return fmt.Errorf("moves listener: listen: %w", err)
	}
	connected()
	for {
		wctx, cancel := context.WithTimeout(ctx, 15*time.Second)
		n, err := conn.WaitForNotification(wctx)
		cancel()
		if ctx.Err() != nil {
			return nil
		}
		if errors.Is(err, context.DeadlineExceeded) {
			pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			err = conn.Ping(pctx)
			cancel()
			if err != nil {
				return fmt.Errorf("moves listener: ping: %w", err)
			}
			continue
		}
		if err != nil {
			return fmt.Errorf("moves listener: wait: %w", err)
		}
		m, err := ParseMove(n.Payload)
		if err != nil {
			log.Warn("moves listener: bad payload skipped", "err", err)
			continue
		}
		onMove(m)
	}
}

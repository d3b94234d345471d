package store

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
)

// ControlChannelPrefix is the prefix of the control channel; the channel is
// ControlChannelPrefix + the schema name. Its payloads are lines of control
// messages (ParseControl), from the read trigger (migration 007) and from nodes
// (Control).
const ControlChannelPrefix = "notifyd-control:"

// maxControlPayload bounds one NOTIFY payload we send (Postgres' limit is 8,000 bytes).
const maxControlPayload = 7000

// ControlKind is the type of a control message.
type ControlKind uint8

// The control messages.
const (
	// ControlRead: IDs of User were read (in seq order); Unread is the user's
	// authoritative unread count after that commit. IDs may be empty (rows marked unread).
	ControlRead ControlKind = iota + 1
	// ControlReadRange: as ControlRead, but the ids were too many for a payload: they
	// are the rows of User with seq FromSeq..ToSeq read between FromUS and ToUS
	// (epoch microseconds), which the receiver looks up (ReadIDs).
	ControlReadRange
	// ControlKick: end Session of User with `bye kicked`, wherever it lives.
	ControlKick
	// ControlReplace: end Session of User with `bye replaced`: it resumed on another node.
	ControlReplace
	// ControlTouch: the sessions in IDs were heard from (through another node).
	ControlTouch
	// ControlMoved: the client of long-poll Session (of User) polls another
	// node, as session To, and holds everything up to Cursor; the node holding
	// Session drops its copy without a bye.
	ControlMoved
	// ControlEnd: the node holding Session (an adopted long-poll session of
	// User) ends it for Reason, which the session it was adopted from had
	// ended with before its bye reached the client (kicked, heartbeat_timeout, ...).
	ControlEnd
	// ControlAck: the client of Session (of User) acked IDs through another
	// node; the node holding Session judges them as it judges a local ack
	// (only ids it sent the session, at the session's ack rate).
	ControlAck
	// ControlRelay: a `read` (IDs, Unread) that was queued on the old copy of
	// a long-poll session when it moved, for the adopted Session (of User) to
	// send; the node holding Session queues it unless it sent the same read.
	ControlRelay
)

// ControlMessage is one line of the control channel.
type ControlMessage struct {
	Kind           ControlKind
	User           string
	Session        string
	Unread         int64
	IDs            []string
	FromSeq, ToSeq int64
	FromUS, ToUS   int64
	To             string // ControlMoved: the session id on the adopting node
	Cursor         int64  // ControlMoved: the client holds everything up to it
	Reason         string // ControlEnd
}

// The wire form, one message per line, fields separated by tabs, the user id (which an
// application's SQL may fill with any text but a newline) last:
//
//	read<TAB>unread<TAB>id,id,…<TAB>user
//	readrange<TAB>unread<TAB>from_seq<TAB>to_seq<TAB>from_us<TAB>to_us<TAB>user
//	kick<TAB>session<TAB>user
//	replace<TAB>session<TAB>user
//	touch<TAB>session,session,…
//	moved<TAB>session<TAB>to<TAB>cursor<TAB>user
//	end<TAB>session<TAB>reason<TAB>user
//	ack<TAB>session<TAB>id,id,…<TAB>user
//	relay<TAB>session<TAB>unread<TAB>id,id,…<TAB>user
var controlFields = map[string]struct {
	kind ControlKind
	n    int // fields after the type, the user included
}{
	"read": {ControlRead, 3}, "readrange": {ControlReadRange, 6},
	"kick": {ControlKick, 2}, "replace": {ControlReplace, 2}, "touch": {ControlTouch, 1},
	"moved": {ControlMoved, 4}, "end": {ControlEnd, 3}, "ack": {ControlAck, 3},
	"relay": {ControlRelay, 4},
}

// ParseControl parses a control payload: lines separated by newlines, empty
// ones skipped. It returns every well-formed message, and an error naming the
// malformed lines if there were any.
func ParseControl(p string) ([]ControlMessage, error) {
	return parseLines(p, "control payload", parseControlLine)
}

func parseControlLine(line string) (ControlMessage, error) {
	typ, rest, ok := strings.Cut(line, "\t")
	spec, known := controlFields[typ]
	if !ok || !known {
		return ControlMessage{}, fmt.Errorf("unknown control message %.20q", typ)
	}
	// The last field (the user) may hold tabs: split off the others only.
	f := strings.SplitN(rest, "\t", spec.n)
	if len(f) != spec.n {
		return ControlMessage{}, fmt.Errorf("%s: want %d fields, got %d", typ, spec.n, len(f))
	}
	m := ControlMessage{Kind: spec.kind}
	var err error
	num := func(s string) int64 {
		v, e := strconv.ParseInt(s, 10, 64)
		if e != nil && err == nil {
			err = fmt.Errorf("%s: %w", typ, e)
		}
		return v
	}
	switch spec.kind {
	case ControlRead:
		m.Unread, m.IDs, m.User = num(f[0]), splitList(f[1]), f[2]
	case ControlReadRange:
		m.Unread, m.FromSeq, m.ToSeq, m.FromUS, m.ToUS, m.User = num(f[0]), num(f[1]), num(f[2]), num(f[3]), num(f[4]), f[5]
		if err == nil && (m.FromSeq > m.ToSeq || m.FromUS > m.ToUS) {
			err = fmt.Errorf("readrange: empty range")
		}
	case ControlKick, ControlReplace:
		m.Session, m.User = f[0], f[1]
		if m.Session == "" {
			err = fmt.Errorf("%s: no session", typ)
		}
	case ControlTouch:
		m.IDs = splitList(f[0])
	case ControlMoved:
		m.Session, m.To, m.Cursor, m.User = f[0], f[1], num(f[2]), f[3]
		if err == nil && (m.Session == "" || m.To == "") {
			err = fmt.Errorf("moved: no session")
		}
		if err == nil && m.Cursor < 0 {
			err = fmt.Errorf("moved: negative cursor")
		}
	case ControlEnd:
		m.Session, m.Reason, m.User = f[0], f[1], f[2]
		if m.Session == "" || m.Reason == "" {
			err = fmt.Errorf("end: no session or reason")
		}
	case ControlAck:
		m.Session, m.IDs, m.User = f[0], splitList(f[1]), f[2]
		if m.Session == "" || len(m.IDs) == 0 {
			err = fmt.Errorf("ack: no session or ids")
		}
	case ControlRelay:
		m.Session, m.Unread, m.IDs, m.User = f[0], num(f[1]), splitList(f[2]), f[3]
		if err == nil && m.Session == "" {
			err = fmt.Errorf("relay: no session")
		}
	}
	if err == nil && m.Unread < 0 {
		err = fmt.Errorf("%s: negative unread count", typ)
	}
	if err != nil {
		return ControlMessage{}, err
	}
	return m, nil
}

func splitList(s string) []string {
	if s == "" {
		return nil
	}
	return strings.Split(s, ",")
}

// appendLine appends m's wire form. Session ids and user ids must hold no
// newline, session ids no tab or comma (the hub's ids are base64url), a
// move's reason no tab.
func (m ControlMessage) appendLine(b []byte) []byte {
	switch m.Kind {
	case ControlKick, ControlReplace:
		if m.Kind == ControlKick {
			b = append(b, "kick\t"...)
		} else {
			b = append(b, "replace\t"...)
		}
		b = append(b, m.Session...)
		b = append(b, '\t')
		b = append(b, m.User...)
	case ControlTouch:
		b = append(b, "touch\t"...)
		b = append(b, strings.Join(m.IDs, ",")...)
	case ControlRead:
		b = append(b, "read\t"...)
		b = strconv.AppendInt(b, m.Unread, 10)
		b = append(b, '\t')
		b = append(b, strings.Join(m.IDs, ",")...)
		b = append(b, '\t')
		b = append(b, m.User...)
	case ControlReadRange:
		b = append(b, "readrange\t"...)
		for _, v := range []int64{m.Unread, m.FromSeq, m.ToSeq, m.FromUS, m.ToUS} {
			b = strconv.AppendInt(b, v, 10)
			b = append(b, '\t')
		}
		b = append(b, m.User...)
	case ControlMoved:
		b = append(b, "moved\t"...)
		b = append(b, m.Session...)
		b = append(b, '\t')
		b = append(b, m.To...)
		b = append(b, '\t')
		b = strconv.AppendInt(b, m.Cursor, 10)
		b = append(b, '\t')
		b = append(b, m.User...)
	case ControlEnd:
		b = append(b, "end\t"...)
		b = append(b, m.Session...)
		b = append(b, '\t')
		b = append(b, m.Reason...)
		b = append(b, '\t')
		b = append(b, m.User...)
	case ControlAck:
		b = append(b, "ack\t"...)
		b = append(b, m.Session...)
		b = append(b, '\t')
		b = append(b, strings.Join(m.IDs, ",")...)
		b = append(b, '\t')
		b = append(b, m.User...)
	case ControlRelay:
		b = append(b, "relay\t"...)
		b = append(b, m.Session...)
		b = append(b, '\t')
		b = strconv.AppendInt(b, m.Unread, 10)
		b = append(b, '\t')
		b = append(b, strings.Join(m.IDs, ",")...)
		b = append(b, '\t')
		b = append(b, m.User...)
	}
	return b
}

// FormatControl packs messages into payloads of at most 7,000 bytes each (a
// single message longer than that gets a payload of its own).
func FormatControl(msgs []ControlMessage) []string {
	var out []string
	var cur, line []byte
	for _, m := range msgs {
		line = m.appendLine(line[:0])
		if len(cur) > 0 && len(cur)+1+len(line) > maxControlPayload {
			out = append(out, string(cur))
			cur = cur[:0]
		}
		if len(cur) > 0 {
			cur = append(cur, '\n')
		}
		cur = append(cur, line...)
	}
	if len(cur) > 0 {
		out = append(out, string(cur))
	}
	return out
}

// ReadIDs resolves a ControlReadRange: the ids of user's rows with seq
// fromSeq..toSeq whose read_at lies in fromUS..toUS (epoch microseconds), in seq order.
func (s *Store) ReadIDs(ctx context.Context, m ControlMessage) ([]string, error) {
	rows, err := s.pool.Query(ctx, `SELECT n.id::text FROM notifications n
		WHERE n.user_id = $1 AND n.seq BETWEEN $2 AND $3 AND n.read_at IS NOT NULL
			AND floor(extract(epoch FROM n.read_at) * 1000000)::bigint BETWEEN $4 AND $5
		ORDER BY n.seq`, m.User, m.FromSeq, m.ToSeq, m.FromUS, m.ToUS)
	if err != nil {
		return nil, DBError(fmt.Sprintf("store: read ids of %q", m.User), err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, DBError(fmt.Sprintf("store: read ids of %q", m.User), err)
	}
	return ids, nil
}

// Control sends session control to the node that holds a session, through
// the control channel: the sender does not know which node that is, so every
// node gets the message and the one that holds the session acts on it
// (realtime.Control). A session is known to the cluster by its open
// session_history row, which the recorder writes within its flush interval
// of the connect (DefaultRecorderFlushEvery): a session younger than that
// is not found through another node yet.
type Control struct {
	s       *Store
	log     *slog.Logger
	touches chan string
	dropped atomic.Uint64
}

// NewControl returns the store's control sender; call Run for touches.
func (s *Store) NewControl(log *slog.Logger) *Control {
	if log == nil {
		log = slog.Default()
	}
	return &Control{s: s, log: log, touches: make(chan string, 4096)}
}

// controlChannelSQL is the control channel of the connection's schema, in SQL.
const controlChannelSQL = `'` + ControlChannelPrefix + `' || current_schema()`

// liveSessionRow is the condition on a session_history row s of a session
// some live node holds: open, and written by a node whose lease runs (or by
// a node from before leases: no node id). A session of a node whose lease
// lapsed is no one's, though its row stays open until a survivor closes it
// as node_lost.
const liveSessionRow = `s.ended_at IS NULL AND (s.node_id IS NULL OR EXISTS (
	SELECT 1 FROM nodes n WHERE n.node_id = s.node_id AND n.lease_until > now()))`

// SessionRef is what the cluster knows of a session id: the user and
// transport of its newest session_history row, and whether some live node
// holds it (liveSessionRow).
type SessionRef struct {
	User, Transport string
	Live            bool
}

// SessionOf returns the newest session_history row of the session with this
// id, whichever node wrote it, open or ended; ok is false when there is none
// (never recorded, or its row is not written yet).
func (c *Control) SessionOf(ctx context.Context, id string) (ref SessionRef, ok bool, err error) {
	err = c.s.pool.QueryRow(ctx, `SELECT s.user_id, s.transport, `+liveSessionRow+` FROM session_history s
		WHERE s.session_id = $1 ORDER BY s.connected_at DESC LIMIT 1`, id).Scan(&ref.User, &ref.Transport, &ref.Live)
	if errors.Is(err, pgx.ErrNoRows) {
		return SessionRef{}, false, nil
	}
	if err != nil {
		return SessionRef{}, false, DBError("store: look up session", err)
	}
	return ref, true, nil
}

// Kick asks the node holding session id to end it with `bye kicked`; user,
// when not empty, must be the session's user. It reports whether an open
// session was found (and told). One round trip.
func (c *Control) Kick(ctx context.Context, id, user string) (bool, error) {
	// The payload is ControlKick's wire form, the user taken from the row.
	var n int64
	err := c.s.pool.QueryRow(ctx, `SELECT count(*) FROM (
			SELECT pg_notify(`+controlChannelSQL+`, 'kick' || E'\t' || s.session_id || E'\t' || s.user_id)
			FROM (SELECT s.session_id, s.user_id FROM session_history s
				WHERE s.session_id = $1 AND ($2 = '' OR s.user_id = $2) AND `+liveSessionRow+` LIMIT 1) s
		) x`, id, user).Scan(&n)
	if err != nil {
		return false, DBError("store: kick session", err)
	}
	return n > 0, nil
}

// Replace asks the node holding session id of user to end it with `bye
// replaced` (the session resumed elsewhere), and closes its open history rows
// as replaced in the same statement, so that the cluster's record never shows
// the device twice. It reports whether an open session was found.
func (c *Control) Replace(ctx context.Context, id, user string) (bool, error) {
	if strings.ContainsAny(id, "\t\n,") || strings.ContainsRune(user, '\n') {
		return false, nil // no session id of ours; and the payload would not parse
	}
	payload := string(ControlMessage{Kind: ControlReplace, Session: id, User: user}.appendLine(nil))
	var n int64
	err := c.s.pool.QueryRow(ctx, `WITH closed AS (
			UPDATE session_history s SET ended_at = now(), end_reason = 'replaced'
			WHERE s.session_id = $1 AND s.user_id = $2 AND `+liveSessionRow+`
			RETURNING 1
		)
		SELECT count(*) FROM (SELECT pg_notify(`+controlChannelSQL+`, $3) FROM (SELECT 1 FROM closed LIMIT 1) one) x`,
		id, user, payload).Scan(&n)
	if err != nil {
		return false, DBError("store: replace session", err)
	}
	return n > 0, nil
}

// Move tells every node of a long-poll move: m is a ControlMoved, a
// ControlEnd or a ControlRelay. Only the node that holds m.Session acts; the
// rest ignore it. A move that a node misses (its listener was reconnecting)
// is lost, and then the session it names ends on that node at its heartbeat
// timeout. A relay whose ids do not fit in one payload, or hold a
// separator, goes with no ids: the unread count alone (PROTOCOL.md allows a
// `read` without ids).
func (c *Control) Move(ctx context.Context, m ControlMessage) error {
	if m.Kind != ControlMoved && m.Kind != ControlEnd && m.Kind != ControlRelay {
		return fmt.Errorf("store: send move: kind %d is no move", m.Kind)
	}
	if strings.ContainsAny(m.Session+m.To+m.Reason, "\t\n") || strings.Contains(m.User, "\n") {
		return fmt.Errorf("store: send move: session or user holds a separator")
	}
	if m.Kind == ControlRelay {
		m = fitRelay(m)
	}
	return c.send(ctx, []ControlMessage{m})
}

// fitRelay drops the ids of a relay that would not fit in one payload or
// would not parse back (an id holding a separator or empty).
func fitRelay(m ControlMessage) ControlMessage {
	size := len(m.appendLine(nil))
	bad := size > maxControlPayload
	for _, id := range m.IDs {
		bad = bad || id == "" || strings.ContainsAny(id, "\t\n,")
	}
	if bad {
		m.IDs = nil
	}
	return m
}

// Ack forwards the acks of ids by the client of session (of user) to the
// node that holds the session, which admits them as it does a local ack
// (realtime.Control.OnAck); every node gets them, only that one acts. Ids
// holding a tab, newline or comma cannot be a notification's and are not
// sent: skipped counts them. The ids go out in as many lines, and payloads,
// as they need. One round trip.
func (c *Control) Ack(ctx context.Context, session, user string, ids []string) (skipped int, err error) {
	if session == "" || strings.ContainsAny(session, "\t\n,") || strings.Contains(user, "\n") {
		return 0, fmt.Errorf("store: send acks: session or user holds a separator")
	}
	keep := make([]string, 0, len(ids))
	for _, id := range ids {
		if id == "" || strings.ContainsAny(id, "\t\n,") {
			skipped++
			continue
		}
		keep = append(keep, id)
	}
	return skipped, c.send(ctx, ackMessages(session, user, keep))
}

// ackMessages splits ids into ack messages of one payload each (at least
// one id per message, however long the session and user).
func ackMessages(session, user string, ids []string) []ControlMessage {
	var out []ControlMessage
	base := len("ack\t\t\t") + len(session) + len(user)
	start, size := 0, base
	for i, id := range ids {
		if i > start && size+len(id)+1 > maxControlPayload {
			out = append(out, ControlMessage{Kind: ControlAck, Session: session, User: user, IDs: ids[start:i]})
			start, size = i, base
		}
		size += len(id) + 1
	}
	if start < len(ids) {
		out = append(out, ControlMessage{Kind: ControlAck, Session: session, User: user, IDs: ids[start:]})
	}
	return out
}

// Touch queues a sign of life for session id, for the node holding it. It
// never blocks: a full queue drops it (the session's next message brings another).
func (c *Control) Touch(id string) {
	select {
	case c.touches <- id:
	default:
		c.dropped.Add(1)
	}
}

// Dropped is the number of touches dropped because the queue was full.
func (c *Control) Dropped() uint64 { return c.dropped.Load() }

// Run sends queued touches until ctx ends: whatever is queued when the
// sender is free goes out at once, many sessions per NOTIFY (one line per
// payload of up to 7,000 bytes), so a burst costs few round trips and a lone
// touch waits for none.
func (c *Control) Run(ctx context.Context) {
	var batch []string
	for {
		select {
		case <-ctx.Done():
			return
		case id := <-c.touches:
			batch = append(batch[:0], id)
		}
	more:
		for len(batch) < 10000 {
			select {
			case id := <-c.touches:
				batch = append(batch, id)
			default:
				break more
			}
		}
		if err := c.send(ctx, touchMessages(batch)); err != nil && ctx.Err() == nil {
			c.log.Warn("control: touches not sent", "sessions", len(batch), "err", err)
		}
	}
}

// touchMessages splits ids into touch messages of one payload each.
func touchMessages(ids []string) []ControlMessage {
	var out []ControlMessage
	start, size := 0, len("touch\t")
	for i, id := range ids {
		if i > start && size+len(id)+1 > maxControlPayload {
			out = append(out, ControlMessage{Kind: ControlTouch, IDs: ids[start:i]})
			start, size = i, len("touch\t")
		}
		size += len(id) + 1
	}
	if start < len(ids) {
		out = append(out, ControlMessage{Kind: ControlTouch, IDs: ids[start:]})
	}
	return out
}

// send NOTIFYs msgs, packed into payloads.
func (c *Control) send(ctx context.Context, msgs []ControlMessage) error {
	if len(msgs) == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	payloads := FormatControl(msgs)
	if _, err := c.s.pool.Exec(ctx, `SELECT pg_notify(`+controlChannelSQL+`, p) FROM unnest($1::text[]) AS t(p)`, payloads); err != nil {
		return DBError("store: send control", err)
	}
	return nil
}

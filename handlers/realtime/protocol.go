// Package realtime holds what every transport shares: the session, the presence
// tracker, the heartbeat sweeper and the hub that delivers notifications. It
// knows nothing of HTTP: transports (handlers/ws.go, sse.go, poll.go) move the
// frames a session queues onto their wire.
package realtime

import (
	"bytes"
	"encoding/json"
	"fmt"
	"time"

	"github.com/notifyd/notifyd/store"
)

// Transport names the way a session is carried.
type Transport string

// The transports, in the order a client tries them.
const (
	WebSocket Transport = "websocket"
	SSE       Transport = "sse"
	LongPoll  Transport = "longpoll"
)

// Transports lists every transport in the default order.
var Transports = []Transport{WebSocket, SSE, LongPoll}

// Valid reports whether t is one of the known transports.
func (t Transport) Valid() bool {
	return t == WebSocket || t == SSE || t == LongPoll
}

// Reason says why a session ended. The first five are sent to the client in
// `bye`; the others are recorded only.
type Reason string

// The reasons a session ends.
const (
	ReasonShutdown     Reason = "shutdown"
	ReasonKicked       Reason = "kicked"
	ReasonReplaced     Reason = "replaced"
	ReasonHeartbeat    Reason = "heartbeat_timeout"
	ReasonSlowConsumer Reason = "slow_consumer"
	ReasonClientClose  Reason = "client_close"
	ReasonError        Reason = "error"
)

// SendsBye reports whether the client is told of this reason with a bye message.
func (r Reason) SendsBye() bool {
	switch r {
	case ReasonShutdown, ReasonKicked, ReasonReplaced, ReasonHeartbeat, ReasonSlowConsumer:
		return true
	}
	return false
}

// Notification is a stored notification as the hub delivers it.
type Notification struct {
	ID        string
	User      string
	Seq       int64
	Topic     string
	Data      json.RawMessage
	CreatedAt time.Time
}

// FromStore converts a stored notification (replay, fetch, catch-up, a
// publish's committed rows) to the hub's form. It is the one place a
// store.Notification becomes a Notification.
func FromStore(n store.Notification) Notification {
	return Notification{ID: n.ID, User: n.UserID, Seq: n.Seq, Topic: n.Topic, Data: n.Data, CreatedAt: n.CreatedAt}
}

// fromStoreAll is FromStore of every row.
func fromStoreAll(rows []store.Notification) []Notification {
	out := make([]Notification, len(rows))
	for i := range rows {
		out[i] = FromStore(rows[i])
	}
	return out
}

// Frame is one encoded server-to-client message. Frames are immutable once
// built, so one frame may be queued to many sessions.
type Frame struct {
	// Type is the message type ("notification", "pong", ...).
	Type string
	// Seq and ID identify a notification frame; zero otherwise.
	Seq int64
	ID  string
	// CreatedAt is the notification's commit time (zero for other frames),
	// kept for delivery latency.
	CreatedAt time.Time
	// Replayed marks a notification sent from the replay backlog.
	Replayed bool
	// JSON is the whole message, encoded.
	JSON []byte
}

// Message types sent by the server.
const (
	TypeHello        = "hello"
	TypeNotification = "notification"
	TypeSynced       = "synced"
	TypePong         = "pong"
	TypeRead         = "read"
	TypeBye          = "bye"
	TypeError        = "error"
)

type helloMsg struct {
	Type           string    `json:"type"`
	Session        string    `json:"session"`
	User           string    `json:"user"`
	Transport      Transport `json:"transport"`
	PingIntervalMs int64     `json:"ping_interval_ms"`
	PingTimeoutMs  int64     `json:"ping_timeout_ms"`
	ServerTime     string    `json:"server_time"`
}

type notificationMsg struct {
	Type      string          `json:"type"`
	ID        string          `json:"id"`
	Seq       int64           `json:"seq"`
	Topic     string          `json:"topic"`
	Data      json.RawMessage `json:"data"`
	CreatedAt string          `json:"created_at"`
	Replayed  bool            `json:"replayed"`
}

type syncedMsg struct {
	Type      string `json:"type"`
	Cursor    int64  `json:"cursor"`
	Unread    int64  `json:"unread"`
	Truncated bool   `json:"truncated"`
}

type readMsg struct {
	Type   string   `json:"type"`
	IDs    []string `json:"ids"`
	Unread int64    `json:"unread"`
}

type byeMsg struct {
	Type    string `json:"type"`
	Reason  Reason `json:"reason"`
	RetryMs int64  `json:"retry_ms"`
}

type errorMsg struct {
	Type    string `json:"type"`
	Code    string `json:"code"`
	Message string `json:"message"`
}

// TimeFormat is how every timestamp on the wire is written (RFC 3339, UTC, ms).
const TimeFormat = "2006-01-02T15:04:05.000Z07:00"

// WireTime writes t as every timestamp on the wire is written: RFC 3339 in
// UTC with milliseconds (TimeFormat). AppendPong writes the same bytes by hand.
func WireTime(t time.Time) string { return t.UTC().Format(TimeFormat) }

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		// Every message type above marshals; data is json.RawMessage validated on publish.
		panic(fmt.Sprintf("realtime: encode %T: %v", v, err))
	}
	return b
}

// HelloFrame builds the first message of a session.
func HelloFrame(s *Session, pingInterval, pingTimeout time.Duration, now time.Time) Frame {
	return Frame{Type: TypeHello, JSON: mustJSON(helloMsg{
		Type: TypeHello, Session: s.ID, User: s.User, Transport: s.Transport,
		PingIntervalMs: pingInterval.Milliseconds(), PingTimeoutMs: pingTimeout.Milliseconds(),
		ServerTime: WireTime(now),
	})}
}

// NotificationFrame encodes n; replayed says whether it comes from the backlog.
func NotificationFrame(n Notification, replayed bool) Frame {
	data := n.Data
	if len(bytes.TrimSpace(data)) == 0 {
		data = json.RawMessage("null")
	}
	return Frame{Type: TypeNotification, Seq: n.Seq, ID: n.ID, CreatedAt: n.CreatedAt, Replayed: replayed,
		JSON: mustJSON(notificationMsg{
			Type: TypeNotification, ID: n.ID, Seq: n.Seq, Topic: n.Topic, Data: data,
			CreatedAt: WireTime(n.CreatedAt), Replayed: replayed,
		})}
}

// SyncedFrame marks the end of the replay backlog.
func SyncedFrame(cursor, unread int64, truncated bool) Frame {
	return Frame{Type: TypeSynced, JSON: mustJSON(syncedMsg{Type: TypeSynced, Cursor: cursor, Unread: unread, Truncated: truncated})}
}

// PongFrame answers a ping with the server's time. It is the message an idle
// server sends most, so it is appended by hand (the same bytes json.Marshal
// gives: the time has nothing to escape) rather than through reflection,
// which costs CPU and deepens the stack of the connection's reader.
func PongFrame(now time.Time) Frame {
	return Frame{Type: TypePong, JSON: AppendPong(make([]byte, 0, 64), now)}
}

// AppendPong appends the pong message (PongFrame's JSON) to b. It needs
// little stack: a WebSocket answers pings on a goroutine whose stack must stay
// at its first 2 KiB, and time.Time.AppendFormat alone grows it past that.
func AppendPong(b []byte, now time.Time) []byte {
	b = append(b, `{"type":"pong","server_time":"`...)
	b = appendUTC(b, now)
	return append(b, `"}`...)
}

// appendUTC appends t in UTC as TimeFormat does (2006-01-02T15:04:05.000Z),
// for years 0 to 9999.
func appendUTC(b []byte, t time.Time) []byte {
	t = t.UTC()
	year, month, day := t.Date()
	hour, minute, sec := t.Clock()
	b = appendDigits(b, year, 4)
	b = append(b, '-')
	b = appendDigits(b, int(month), 2)
	b = append(b, '-')
	b = appendDigits(b, day, 2)
	b = append(b, 'T')
	b = appendDigits(b, hour, 2)
	b = append(b, ':')
	b = appendDigits(b, minute, 2)
	b = append(b, ':')
	b = appendDigits(b, sec, 2)
	b = append(b, '.')
	b = appendDigits(b, t.Nanosecond()/1e6, 3)
	return append(b, 'Z')
}

// appendDigits appends v (not negative) in exactly width decimal digits.
func appendDigits(b []byte, v, width int) []byte {
	n := len(b)
	for range width {
		b = append(b, '0')
	}
	for i := len(b) - 1; i >= n; i-- {
		b[i] = byte('0' + v%10)
		v /= 10
	}
	return b
}

// ReadFrame tells a session that ids were marked read and the user's unread count.
func ReadFrame(ids []string, unread int64) Frame {
	if ids == nil {
		ids = []string{}
	}
	return Frame{Type: TypeRead, JSON: mustJSON(readMsg{Type: TypeRead, IDs: ids, Unread: unread})}
}

// ByeFrame tells the client why the server ends the session and when to retry.
func ByeFrame(reason Reason, retry time.Duration) Frame {
	return Frame{Type: TypeBye, JSON: mustJSON(byeMsg{Type: TypeBye, Reason: reason, RetryMs: retry.Milliseconds()})}
}

// ErrorFrame reports a problem with something the client sent.
func ErrorFrame(code, message string) Frame {
	return Frame{Type: TypeError, JSON: mustJSON(errorMsg{Type: TypeError, Code: code, Message: message})}
}

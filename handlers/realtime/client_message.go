package realtime

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
)

// Client message types.
const (
	ClientPing = "ping"
	ClientAck  = "ack"
	ClientRead = "read"
)

// Limits on what one client message may carry.
const (
	// MaxIDsPerMessage bounds the ids of one ack or read.
	MaxIDsPerMessage = 1000
	// MaxMessagesPerBatch bounds an array of messages (POST /v1/sessions/{session}/messages).
	MaxMessagesPerBatch = 100
	maxIDLength         = 64
)

// ClientMessage is one message from a client, on any transport.
type ClientMessage struct {
	Type    string   `json:"type"`
	IDs     []string `json:"ids,omitempty"`
	UpToSeq int64    `json:"up_to_seq,omitempty"`
}

// ProtocolError is a client message the server cannot accept. Code is the
// `error.code` sent back.
type ProtocolError struct {
	Code    string
	Message string
}

func (e *ProtocolError) Error() string { return e.Code + ": " + e.Message }

func badMessage(format string, args ...any) error {
	return &ProtocolError{Code: "bad_message", Message: fmt.Sprintf(format, args...)}
}

// ParseClientMessages reads one message object or an array of them. Every
// message is validated; the first bad one fails the whole input, so a client
// never has half of a batch applied.
func ParseClientMessages(b []byte) ([]ClientMessage, error) {
	b = bytes.TrimSpace(b)
	if len(b) == 0 {
		return nil, badMessage("empty message")
	}
	var msgs []ClientMessage
	if b[0] == '[' {
		if err := decodeStrict(b, &msgs); err != nil {
			return nil, err
		}
		if len(msgs) == 0 {
			return nil, badMessage("empty array")
		}
		if len(msgs) > MaxMessagesPerBatch {
			return nil, badMessage("at most %d messages at once", MaxMessagesPerBatch)
		}
	} else {
		var m ClientMessage
		if err := decodeStrict(b, &m); err != nil {
			return nil, err
		}
		msgs = []ClientMessage{m}
	}
	for i := range msgs {
		if err := msgs[i].validate(); err != nil {
			return nil, err
		}
	}
	return msgs, nil
}

func decodeStrict(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var syn *json.SyntaxError
		var typ *json.UnmarshalTypeError
		switch {
		case errors.As(err, &syn):
			return badMessage("invalid JSON at offset %d", syn.Offset)
		case errors.As(err, &typ):
			return badMessage("field %q has the wrong type", typ.Field)
		}
		return badMessage("invalid message: %v", err)
	}
	if dec.More() {
		return badMessage("trailing data after the message")
	}
	// Decode stops after the first value; anything but white space after it is an error.
	if _, err := dec.Token(); err == nil {
		return badMessage("trailing data after the message")
	}
	return nil
}

func (m *ClientMessage) validate() error {
	switch m.Type {
	case ClientPing:
		if len(m.IDs) > 0 || m.UpToSeq != 0 {
			return badMessage("ping takes no fields")
		}
	case ClientAck:
		if len(m.IDs) == 0 {
			return badMessage("ack needs ids")
		}
		if m.UpToSeq != 0 {
			return badMessage("ack takes ids only")
		}
	case ClientRead:
		if (len(m.IDs) == 0) == (m.UpToSeq == 0) {
			return badMessage("read needs either ids or up_to_seq")
		}
		if m.UpToSeq < 0 {
			return badMessage("up_to_seq must be positive")
		}
	case "":
		return badMessage("missing type")
	default:
		return &ProtocolError{Code: "unknown_type", Message: fmt.Sprintf("unknown message type %q", truncate(m.Type, 32))}
	}
	if len(m.IDs) > MaxIDsPerMessage {
		return badMessage("at most %d ids at once", MaxIDsPerMessage)
	}
	for _, id := range m.IDs {
		if id == "" || len(id) > maxIDLength {
			return badMessage("ids must be 1 to %d characters", maxIDLength)
		}
	}
	return nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}

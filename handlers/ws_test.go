package handlers

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/gorilla/websocket"
)

// appendTextFrame's frames, all sent in one write around the length
// encodings' edges (125/126 bytes, 65535/65536), read back by gorilla's
// client as the same text messages, in order, with a close frame that
// gorilla writes itself between them.
func TestAppendTextFrameReadByGorilla(t *testing.T) {
	sizes := []int{0, 1, 125, 126, 127, 65535, 65536, 70000}
	payload := func(n int) []byte { return bytes.Repeat([]byte{'a' + byte(n%26)}, n) }
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		conn, err := (&websocket.Upgrader{}).Upgrade(w, r, nil)
		if err != nil {
			return
		}
		defer conn.Close()
		var b []byte
		for _, n := range sizes {
			b = appendTextFrame(b, payload(n))
		}
		if _, err := conn.NetConn().Write(b); err != nil {
			t.Error(err)
			return
		}
		_ = conn.WriteMessage(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, "done"))
		_, _, _ = conn.ReadMessage() // until the client's close
	}))
	defer srv.Close()
	c, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(srv.URL, "http"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for _, n := range sizes {
		typ, got, err := c.ReadMessage()
		if err != nil {
			t.Fatalf("message of %d bytes: %v", n, err)
		}
		if typ != websocket.TextMessage || !bytes.Equal(got, payload(n)) {
			t.Fatalf("message of %d bytes: type %d, %d bytes back", n, typ, len(got))
		}
	}
	if _, _, err := c.ReadMessage(); !websocket.IsCloseError(err, websocket.CloseNormalClosure) {
		t.Fatalf("after the messages: %v, want the close frame", err)
	}
}

// isPingFrame knows the client's ping under any mask, and nothing else: not
// another payload, an unmasked or non-final frame, or another opcode.
func TestIsPingFrame(t *testing.T) {
	frame := func(b0, b1 byte, mask [4]byte, payload string) []byte {
		b := []byte{b0, b1, mask[0], mask[1], mask[2], mask[3]}
		for i := range len(payload) {
			b = append(b, payload[i]^mask[i%4])
		}
		return b
	}
	for _, mask := range [][4]byte{{0, 0, 0, 0}, {1, 2, 3, 4}, {0xff, 0x80, 0x7f, 0x01}} {
		if !isPingFrame(frame(0x81, 0x8f, mask, `{"type":"ping"}`)) {
			t.Fatalf("the ping under mask %v not known", mask)
		}
		for name, b := range map[string][]byte{
			"other payload": frame(0x81, 0x8f, mask, `{"type":"pong"}`),
			"not final":     frame(0x01, 0x8f, mask, `{"type":"ping"}`),
			"binary":        frame(0x82, 0x8f, mask, `{"type":"ping"}`),
			"unmasked":      frame(0x81, 0x0f, mask, `{"type":"ping"}`),
			"close":         frame(0x88, 0x8f, mask, `{"type":"ping"}`),
		} {
			if len(b) == wsPingFrame && isPingFrame(b) {
				t.Fatalf("%s (mask %v) taken for a ping", name, mask)
			}
		}
	}
}

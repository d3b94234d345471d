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

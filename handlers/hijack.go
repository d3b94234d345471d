package handlers

import (
	"bytes"
	"net"
	"net/http"
	"time"
)

// Event streams and waiting polls are answered on the connection itself,
// taken from net/http (hijacked) once the request has been checked. While a
// handler runs, net/http keeps its goroutine, a second one reading in the
// background, and read and write buffers: about 30 KiB per open request,
// most of an idle SSE or long-poll session. After the hijack the handler
// returns and the session keeps only what it needs. The answer says
// Connection: close and the connection is closed after it, since it cannot
// be handed back to net/http.

// hijack takes w's connection, with no deadline left on it.
func hijack(w http.ResponseWriter) (net.Conn, error) {
	conn, _, err := http.NewResponseController(w).Hijack()
	if err != nil {
		return nil, err
	}
	// The server may have left deadlines on the connection; ours are per write.
	_ = conn.SetDeadline(time.Time{})
	return conn, nil
}

// onClose calls gone once the client has closed conn, it failed, or the
// client sent anything. The protocol has the client send nothing after its
// request, so the first read that returns ends the wait: on bytes received
// the connection is closed as well (a client writing into its stream gets
// cut off after one read, not served a system call per byte). It keeps one
// small goroutine per connection.
func onClose(conn net.Conn, gone func()) {
	go func() {
		var b [64]byte
		n, _ := conn.Read(b[:])
		if n > 0 {
			_ = conn.Close()
		}
		gone()
	}()
}

// responseHead is a 200 response header with what the middleware set (CORS,
// Vary), then set, and Connection: close.
func responseHead(h http.Header, set map[string]string) []byte {
	h = h.Clone()
	for _, k := range []string{"Content-Length", "Transfer-Encoding", "Expires", "Pragma"} {
		h.Del(k)
	}
	for k, v := range set {
		h.Set(k, v)
	}
	h.Set("Connection", "close")
	var b bytes.Buffer
	b.WriteString("HTTP/1.1 200 OK\r\n")
	_ = h.Write(&b)
	b.WriteString("\r\n")
	return b.Bytes()
}

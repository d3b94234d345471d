package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// certWatchEvery is how often the certificate files are checked for a change.
const certWatchEvery = 5 * time.Second

// certReloader holds the certificate the server presents and replaces it
// when its files change: on SIGHUP, and when a poll sees either file's size
// or modification time change (a renewal by certbot or a mounted secret).
// A pair that fails to load is logged and the last good one kept, so a
// renewal caught halfway through (the new certificate next to the old key)
// never takes the server down; the next check loads the finished pair.
type certReloader struct {
	certFile, keyFile string
	log               *slog.Logger

	cert atomic.Pointer[tls.Certificate]

	mu    sync.Mutex // serializes reloads
	stamp string     // the files' sizes and times at the last load
}

// newCertReloader loads the pair once; an error here stops the server at start.
func newCertReloader(certFile, keyFile string, log *slog.Logger) (*certReloader, error) {
	r := &certReloader{certFile: certFile, keyFile: keyFile, log: log}
	if err := r.reload(); err != nil {
		return nil, err
	}
	return r, nil
}

// reload loads the pair from its files and, when it parses, serves it to
// every handshake after this call.
func (r *certReloader) reload() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	stamp := r.fileStamp()
	cert, err := tls.LoadX509KeyPair(r.certFile, r.keyFile)
	if err != nil {
		return fmt.Errorf("TLS certificate %s, key %s: %w", r.certFile, r.keyFile, err)
	}
	r.cert.Store(&cert)
	r.stamp = stamp
	return nil
}

// getCertificate is tls.Config.GetCertificate: the latest pair loaded.
func (r *certReloader) getCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return r.cert.Load(), nil
}

// fileStamp is the size and modification time of both files ("" for one
// that cannot be read).
func (r *certReloader) fileStamp() string {
	var s string
	for _, f := range []string{r.certFile, r.keyFile} {
		if fi, err := os.Stat(f); err == nil {
			s += fmt.Sprintf("%d/%d;", fi.Size(), fi.ModTime().UnixNano())
		} else {
			s += ";"
		}
	}
	return s
}

// watch reloads on SIGHUP and on a change of the files until ctx ends.
func (r *certReloader) watch(ctx context.Context) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	tick := time.NewTicker(certWatchEvery)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
			r.reloadLogged("SIGHUP")
		case <-tick.C:
			if r.changed() {
				r.reloadLogged("files changed")
			}
		}
	}
}

// changed reports whether either file differs from what the last load read.
func (r *certReloader) changed() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.fileStamp() != r.stamp
}

func (r *certReloader) reloadLogged(why string) {
	if err := r.reload(); err != nil {
		r.log.Error("TLS certificate reload failed; serving the previous one", "why", why, "err", err)
		return
	}
	r.log.Info("TLS certificate reloaded", "why", why, "cert", r.certFile)
}

// tlsConfig serves r's certificate with HTTP/2 offered first (ALPN h2, then
// http/1.1: WebSocket clients ask for http/1.1 and get it, since gorilla
// needs the connection that HTTP/2 cannot hand over).
func tlsConfig(r *certReloader) *tls.Config {
	return &tls.Config{
		MinVersion:     tls.VersionTLS12,
		GetCertificate: r.getCertificate,
		NextProtos:     []string{"h2", "http/1.1"},
	}
}

// errNoTLS is returned by Main.ReloadCertificate on a server without TLS.
var errNoTLS = errors.New("the server does not serve TLS")

// ReloadCertificate loads the certificate files again, as SIGHUP does.
func (m *Main) ReloadCertificate() error {
	if m.certs == nil {
		return errNoTLS
	}
	return m.certs.reload()
}

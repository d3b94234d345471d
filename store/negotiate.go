package store

import (
	"context"
	"fmt"
	"net/netip"
	"time"
)

// TransportReport is what one user saw of one transport from a network (the
// /24 or /48 of the client) and browser family.
type TransportReport struct {
	Network   netip.Prefix
	Browser   string
	Transport string
	User      string
	OK        bool
	Reason    string // "" for none
	At        time.Time
}

// TransportUsers counts the distinct users of one transport on a network and
// browser family: Seen the server saw deliver over it; of the others, Worked
// and Failed whose latest report was a success or a failure.
type TransportUsers struct {
	Seen, Worked, Failed int
}

// ReportTransports stores client reports; each replaces the same user's
// earlier report of that transport there, so a user counts once.
func (s *Store) ReportTransports(ctx context.Context, rs []TransportReport) error {
	for _, r := range rs {
		if err := s.upsertObservation(ctx, r, "client"); err != nil {
			return err
		}
	}
	return nil
}

// SawTransport stores that the server saw a session of r.User deliver over
// r.Transport (r.OK and r.Reason are ignored).
func (s *Store) SawTransport(ctx context.Context, r TransportReport) error {
	r.OK, r.Reason = true, ""
	return s.upsertObservation(ctx, r, "server")
}

func (s *Store) upsertObservation(ctx context.Context, r TransportReport, source string) error {
	_, err := s.pool.Exec(ctx, `
		INSERT INTO transport_observations (network, browser, transport, user_id, source, ok, reason, at)
		VALUES ($1, $2, $3, $4, $5, $6, NULLIF($7, ''), $8)
		ON CONFLICT (network, browser, transport, user_id, source) DO UPDATE SET
			ok = EXCLUDED.ok, reason = EXCLUDED.reason, at = EXCLUDED.at`,
		r.Network, r.Browser, r.Transport, r.User, source, r.OK, r.Reason, r.At)
	if err != nil {
		return fmt.Errorf("record %s %s observation: %w", source, r.Transport, err)
	}
	return nil
}

// TransportUsers counts, per transport, the users observed on network and
// browser since then. A user the server saw deliver over a transport is
// counted in Seen only, whatever they reported of it.
func (s *Store) TransportUsers(ctx context.Context, network netip.Prefix, browser string, since time.Time) (map[string]TransportUsers, error) {
	rows, err := s.pool.Query(ctx, `
		SELECT transport,
		       count(*) FILTER (WHERE seen),
		       count(*) FILTER (WHERE NOT seen AND ok),
		       count(*) FILTER (WHERE NOT seen AND NOT ok)
		FROM (SELECT DISTINCT ON (transport, user_id) transport, source = 'server' AS seen, ok
		      FROM transport_observations
		      WHERE network = $1 AND browser = $2 AND at > $3
		      ORDER BY transport, user_id, source = 'server' DESC) per_user
		GROUP BY transport`,
		network, browser, since)
	if err != nil {
		return nil, fmt.Errorf("read transport observations: %w", err)
	}
	defer rows.Close()
	out := map[string]TransportUsers{}
	for rows.Next() {
		var tr string
		var u TransportUsers
		if err := rows.Scan(&tr, &u.Seen, &u.Worked, &u.Failed); err != nil {
			return nil, fmt.Errorf("read transport observations: %w", err)
		}
		out[tr] = u
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read transport observations: %w", err)
	}
	return out, nil
}

// ForgetTransports deletes the observations older than before; it returns how many.
func (s *Store) ForgetTransports(ctx context.Context, before time.Time) (int64, error) {
	tag, err := s.pool.Exec(ctx, `DELETE FROM transport_observations WHERE at < $1`, before)
	if err != nil {
		return 0, fmt.Errorf("forget transport observations: %w", err)
	}
	return tag.RowsAffected(), nil
}

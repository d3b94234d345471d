// Package migrations holds the SQL schema of notifyd as tern/v2 migration files
// (NNN_name.sql, "---- create above / drop below ----" separating up and down).
//
// Every table and function is referenced unqualified, so the schema the
// migrations land in is chosen by the connection's search_path.
package migrations

import "embed"

// FS holds the migration files, applied in order by store.(*Store).Migrate.
//
//go:embed *.sql
var FS embed.FS

// Package static holds the files notifyd serves to browsers: the client
// library (notify.js), the demo page and the operator dashboard.
package static

import "embed"

// FS is the embedded static files, served at /.
//
//go:embed *.html *.js *.d.ts *.css
var FS embed.FS

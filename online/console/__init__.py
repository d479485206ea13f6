"""The web console: server-rendered pages over a running online server (`make run`).

`app` serves HTTP (HTTPS with `server.tls_cert`) behind the admin login, `session` keeps
the signed, expiring login sessions, `data` reads what the pages show (the server's own gRPC
API, its online state, the lake's model runs, the metrics registry), `pages` renders HTML;
`static/` holds the one small script (live charts) and the styles.
"""

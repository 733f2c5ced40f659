"""Recipient tracking links (PROTOCOL.md, "Tracking links"): a URL with an unguessable token bound
to one package, opening a small page with the package's state, its ETA and the position of the
driver carrying it, only while that driver holds it.

`view.py` is pure (the window rule and the view); `service.py` reads the link, the package, the
driver's newest position (with the stamp it got at receipt) and the ETA; `http.py` the routes and
the page; `limits.py` the per-link and per-address rate limits. The room never imports custody:
`app.py` hands it the custody layer's marks (`service.Marks`).
"""

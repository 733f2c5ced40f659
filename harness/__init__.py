"""What the tests (tests/) and the benchmarks (bench/) share to run tracker for real and break it.

One module per concept; import the module you need (this package imports nothing by itself):

- ``harness.ports``      a free port on 127.0.0.1; waiting until something listens on one
- ``harness.wait``       ``wait_until`` / ``eventually``: wait on an effect with a deadline
- ``harness.tokens``     tokens signed with the test secret
- ``harness.http``       raw HTTP requests and JSON calls, /readyz, consignments
- ``harness.clients``    the test phone and dashboard over real websockets, frame builders
- ``harness.fleet``      phones that never lose an event (``Driver``) and many of them (``Fleet``)
- ``harness.flood``      many idle sockets against one port
- ``harness.proxy``      a TCP proxy to cut, reset, throttle or mute
- ``harness.servers``    private redis-server and PostgreSQL cluster on spare ports; stopping processes
- ``harness.redis_ha``   Redis with failover: a master, a replica and a Sentinel
- ``harness.instances``  tracker in this event loop (``Instance``) or as a subprocess (``TrackerProc``)
- ``harness.loss``       loss and duplicates as sets over (driver, seq), checked against PostgreSQL
- ``harness.sse``        server-sent events read over a bare stream (a tracking link's live feed)

Rules: the harness may import ``tracker``'s public API; ``tracker`` never imports the harness,
and neither ``tracker`` nor ``bench`` imports ``tests``. Pytest fixtures stay in
tests/conftest.py. The simulator's own sans-I/O phone (``tracker.sim``) is a product feature and
stays apart.
"""

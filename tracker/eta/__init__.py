"""Estimated times of arrival of packages in transit (PROTOCOL.md, "ETA").

`model.py` is pure: the straight-line estimate (distance to the destination times a road factor,
over the driver's recent moving speed, plus a stop per package delivered first) and the
`Estimator` protocol a routing engine (OSRM, Valhalla) can implement later. `service.py` reads
what the estimate needs from PostgreSQL.
"""

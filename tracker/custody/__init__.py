"""Packages and the chain of custody: an extension of the core (tracker/extension.py).

Modules, one concept each:

- ``state``: a package's state as a pure replay of its scans; anomalies and alert keys (pure);
- ``chain``: the HMAC chain of custody and its verification (pure);
- ``store``: the packages' SQL (schema in ``sql/``);
- ``process``: chaining a batch of stored scans in one transaction, and what to publish;
- ``stamps``: which clients may see a driver live (the stamp on its frames);
- ``live``: chaining in the background, recovery sweep, snapshot scope, trail windows;
- ``extension``: `CustodyExtension`, the one object the core calls;
- ``http``: the `/v1/packages` routes.
"""

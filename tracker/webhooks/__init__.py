"""Webhooks: endpoints an org registers, an outbox written with the facts, signed deliveries.

- `sign`: the Standard Webhooks signature scheme and secrets (pure).
- `policy`: which addresses a delivery may reach, the retry schedule (pure).
- `store`: SQL: endpoints, the outbox (`Outbox`, the hook custody writes through), claims, the log.
- `client`: one signed POST to an address resolved, checked and pinned once.
- `worker`: delivery workers that claim due deliveries with FOR UPDATE SKIP LOCKED.
- `http`: the /v1/webhooks routes.
"""

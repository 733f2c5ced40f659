-- Whether a client's live view of the package's holder is open (custody/state.py, `Replay.live`):
-- false once a scan that ends the holder's custody was received after the holder's latest pickup
-- or handover, whatever the scans' ts say. Derived, like `state` and `holder`.
ALTER TABLE packages ADD COLUMN live_view boolean NOT NULL DEFAULT true;

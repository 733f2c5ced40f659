"""Street tiles from a PMTiles archive tracker serves itself (TRACKER_MAP_TILES=<file>.pmtiles):
`pmtiles.py` is the format (pure), `archive.py` the file, `http.py` the routes and the page's settings."""

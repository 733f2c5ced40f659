#!/usr/bin/env python3
"""Build the dashboard's offline basemap (tracker/static/basemap.json) from Natural Earth TopoJSON.

Input: the `world-atlas` countries TopoJSON (countries-50m.json or countries-110m.json).
Output: compact GeoJSON-like data the dashboard draws on its own canvas:

    {"type": "FeatureCollection", "bbox": [...], "source": "...",
     "features": [{"type": "Feature",
                   "properties": {"name": "Kenya", "id": "404", "africa": true, "label": [lon, lat]},
                   "bbox": [w, s, e, n],
                   "geometry": {"type": "MultiPolygon", "coordinates": [[[[lon, lat], ...]]]}}]}

Every African country (Madagascar and the island states included) is kept, plus, as context drawn
more faintly, the parts of neighbouring countries near Africa (southern Europe, the Middle East,
and France's Indian Ocean departments Mayotte and Reunion).

Simplification is Douglas-Peucker applied to each TopoJSON *arc* before the rings are stitched,
so a border shared by two countries is simplified once and both countries keep the identical line
(no slivers or gaps between neighbours). Pure standard library; orjson is used when available.

The input is not in this repository: download `countries-50m.json` from the `world-atlas` package
(Natural Earth's public-domain Admin 0 countries as TopoJSON, ISC licence), for example
https://unpkg.com/world-atlas@2/countries-50m.json or `npm pack world-atlas@2`
(https://github.com/topojson/world-atlas; Natural Earth itself: https://www.naturalearthdata.com/).

    python tools/make_basemap.py --source path/to/countries-50m.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

Point = tuple[float, float]
Ring = list[Point]

# Where the input comes from (it is not in this repository): see the module docstring.
SOURCE_HELP = (
    "the world-atlas countries TopoJSON (countries-50m.json or countries-110m.json): Natural Earth's "
    "public-domain Admin 0 countries, e.g. https://unpkg.com/world-atlas@2/countries-50m.json "
    "(or `npm pack world-atlas@2`; https://github.com/topojson/world-atlas)"
)
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "tracker" / "static" / "basemap.json"

# ISO 3166-1 numeric codes of the African countries and territories present in Natural Earth.
AFRICA_IDS = frozenset(
    {
        "012", "024", "072", "108", "120", "132", "140", "148", "174", "178", "180", "204", "226",
        "231", "232", "262", "266", "270", "288", "324", "384", "404", "426", "430", "434", "450",
        "454", "466", "478", "480", "504", "508", "516", "562", "566", "624", "646", "654", "678",
        "686", "690", "694", "706", "710", "716", "728", "729", "732", "748", "768", "788", "800",
        "818", "834", "854", "894",
    }
)  # fmt: skip
# Natural Earth features without an ISO code that lie in Africa.
AFRICA_NAMES = frozenset({"Somaliland"})
# Other countries are kept as context when their bbox centre lies in this box (w, s, e, n): the
# Mediterranean and the Middle East around Africa, and the western Indian Ocean (see context_polygons).
CONTEXT_BOX = (-30.0, -40.0, 62.0, 47.0)
# Context polygons this small (square degrees of bbox) are dropped: specks far from anything useful.
CONTEXT_MIN_BBOX_AREA = 0.02


def decode_arcs(topology: dict[str, Any]) -> list[list[Point]]:
    """Decode TopoJSON arcs: undo the delta encoding, then the quantisation `transform`."""
    transform = topology.get("transform")
    arcs: list[list[Point]] = []
    for arc in topology["arcs"]:
        if transform is None:
            arcs.append([(float(p[0]), float(p[1])) for p in arc])
            continue
        (kx, ky), (dx, dy) = transform["scale"], transform["translate"]
        x = y = 0
        points: list[Point] = []
        for p in arc:
            x += p[0]
            y += p[1]
            points.append((x * kx + dx, y * ky + dy))
        arcs.append(points)
    return arcs


def _segment_distance(p: Point, a: Point, b: Point) -> float:
    """Distance from p to the segment a-b, in the units of the coordinates."""
    (px, py), (ax, ay), (bx, by) = p, a, b
    vx, vy = bx - ax, by - ay
    length2 = vx * vx + vy * vy
    if length2 == 0.0:
        return math.hypot(px - ax, py - ay)
    t = max(0.0, min(1.0, ((px - ax) * vx + (py - ay) * vy) / length2))
    return math.hypot(px - (ax + t * vx), py - (ay + t * vy))


def douglas_peucker(points: Sequence[Point], tolerance: float) -> list[Point]:
    """Keep the points that deviate more than `tolerance` from the simplified line (iterative, no recursion)."""
    n = len(points)
    if n <= 2:
        return list(points)
    keep = [False] * n
    keep[0] = keep[-1] = True
    stack = [(0, n - 1)]
    while stack:
        first, last = stack.pop()
        worst, worst_index = 0.0, -1
        for i in range(first + 1, last):
            d = _segment_distance(points[i], points[first], points[last])
            if d > worst:
                worst, worst_index = d, i
        if worst > tolerance:
            keep[worst_index] = True
            stack.append((first, worst_index))
            stack.append((worst_index, last))
    return [p for p, k in zip(points, keep, strict=True) if k]


def simplify_arc(points: Sequence[Point], tolerance: float) -> list[Point]:
    """Simplify one arc. A closed arc (an island) is split at its farthest point first,
    because Douglas-Peucker on a line whose ends coincide would collapse it to nothing."""
    if len(points) > 3 and points[0] == points[-1]:
        start = points[0]
        far = max(range(len(points)), key=lambda i: math.hypot(points[i][0] - start[0], points[i][1] - start[1]))
        head = douglas_peucker(points[: far + 1], tolerance)
        tail = douglas_peucker(points[far:], tolerance)
        return head + tail[1:]
    return douglas_peucker(points, tolerance)


def stitch_ring(arc_refs: Iterable[int], arcs: Sequence[Sequence[Point]] | Mapping[int, Sequence[Point]]) -> Ring:
    """Join a ring's arcs; a negative index ~i means arc i reversed. Arcs share their end points."""
    ring: Ring = []
    for ref in arc_refs:
        arc = list(arcs[ref]) if ref >= 0 else list(reversed(arcs[~ref]))
        ring.extend(arc if not ring else arc[1:])
    return ring


def round_ring(ring: Ring, digits: int) -> Ring:
    """Round coordinates and drop the consecutive duplicates that rounding creates."""
    out: Ring = []
    for x, y in ring:
        p = (round(x, digits), round(y, digits))
        if not out or out[-1] != p:
            out.append(p)
    if out and out[0] != out[-1]:
        out.append(out[0])
    return out


def ring_area(ring: Ring) -> float:
    """Signed shoelace area in square degrees (enough to pick the largest polygon)."""
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in itertools.pairwise(ring))


def ring_centroid(ring: Ring) -> Point:
    """Area centroid of a simple ring; falls back to the mean point for degenerate rings."""
    a = ring_area(ring)
    if abs(a) < 1e-12:
        xs, ys = zip(*ring, strict=True)
        return (sum(xs) / len(xs), sum(ys) / len(ys))
    cx = cy = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(ring):
        f = x0 * y1 - x1 * y0
        cx += (x0 + x1) * f
        cy += (y0 + y1) * f
    return (cx / (6 * a), cy / (6 * a))


def bbox_of(rings: Iterable[Ring]) -> list[float]:
    rings = list(rings)
    xs = [x for ring in rings for x, _ in ring]
    ys = [y for ring in rings for _, y in ring]
    return [min(xs), min(ys), max(xs), max(ys)]


def box_centre_in(box: Sequence[float], area: Sequence[float]) -> bool:
    x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return area[0] <= x <= area[2] and area[1] <= y <= area[3]


def polygons_of(geometry: dict[str, Any]) -> list[list[list[int]]]:
    """The arc-index rings of a TopoJSON Polygon/MultiPolygon, as a list of polygons."""
    if geometry.get("type") == "Polygon":
        return [geometry["arcs"]]
    if geometry.get("type") == "MultiPolygon":
        return list(geometry["arcs"])
    return []


def build_polygon(
    polygon: list[list[int]],
    simple_arcs: Sequence[Sequence[Point]],
    raw_arcs: Sequence[Sequence[Point]],
    *,
    digits: int,
    fallback_tolerance: float,
) -> list[Ring] | None:
    """Stitch one polygon (outer ring, then holes). A ring that simplification collapsed below a
    triangle is rebuilt from the raw arcs at a finer tolerance, so small island states survive;
    a hole that still collapses is dropped, an outer ring that does drops the polygon."""
    rings: list[Ring] = []
    for index, arc_refs in enumerate(polygon):
        ring = round_ring(stitch_ring(arc_refs, simple_arcs), digits)
        if len(ring) < 4:
            finer = {_arc_index(r): simplify_arc(raw_arcs[_arc_index(r)], fallback_tolerance) for r in arc_refs}
            ring = round_ring(stitch_ring(arc_refs, finer), digits)
        if len(ring) < 4:
            if index == 0:
                return None
            continue
        rings.append(ring)
    return rings


def _arc_index(ref: int) -> int:
    """TopoJSON writes a reversed arc i as ~i (that is, -i - 1)."""
    return ref if ref >= 0 else ~ref


def context_polygons(polygons: list[list[list[int]]], raw: Sequence[Sequence[Point]]) -> list[list[list[int]]]:
    """The polygons of a non-African country worth drawing around Africa. The country qualifies when
    its largest polygon lies near Africa (so Ukraine or Russia, which only reach into the box with a
    few islands, stay out); then each of its polygons near Africa is kept (France: Corsica, Mayotte
    and Reunion, not Guiana). Polygons cut at the antimeridian span 360 degrees and are dropped."""
    boxes = [bbox_of([stitch_ring(polygon[0], raw)]) for polygon in polygons]
    if not boxes:
        return []
    largest = max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]) if b[2] - b[0] <= 180 else 0.0)
    if not box_centre_in(largest, CONTEXT_BOX):
        return []
    return [
        polygon
        for polygon, box in zip(polygons, boxes, strict=True)
        if box[2] - box[0] <= 180
        and box_centre_in(box, CONTEXT_BOX)
        and (box[2] - box[0]) * (box[3] - box[1]) >= CONTEXT_MIN_BBOX_AREA
    ]


def label_point(polygons: list[list[Ring]]) -> list[float]:
    """A point to write the country's name at: the centroid of its largest polygon."""
    largest = max(polygons, key=lambda rings: abs(ring_area(rings[0])))
    x, y = ring_centroid(largest[0])
    return [round(x, 2), round(y, 2)]


def build(topology: dict[str, Any], *, tolerance: float, context_tolerance: float, digits: int) -> dict[str, Any]:
    raw = decode_arcs(topology)
    fine_tolerance = tolerance / 10
    simple = [simplify_arc(arc, tolerance) for arc in raw]
    rough = [simplify_arc(arc, context_tolerance) for arc in raw]
    features: list[dict[str, Any]] = []
    for geometry in topology["objects"]["countries"]["geometries"]:
        props = geometry.get("properties") or {}
        name = str(props.get("name") or "")
        iso = geometry.get("id")
        africa = iso in AFRICA_IDS or name in AFRICA_NAMES
        arcs = simple if africa else rough
        candidates = polygons_of(geometry)
        if not africa:
            candidates = context_polygons(candidates, raw)
        polygons: list[list[Ring]] = []
        for polygon in candidates:
            rings = build_polygon(polygon, arcs, raw, digits=digits, fallback_tolerance=fine_tolerance)
            if rings:
                polygons.append(rings)
        if not polygons:
            continue
        properties: dict[str, Any] = {"name": name, "africa": africa}
        if iso is not None:
            properties["id"] = str(iso)
        if africa:
            properties["label"] = label_point(polygons)
        features.append(
            {
                "type": "Feature",
                "properties": properties,
                "bbox": bbox_of(rings[0] for rings in polygons),
                "geometry": {
                    "type": "MultiPolygon",
                    "coordinates": [[[list(p) for p in ring] for ring in rings] for rings in polygons],
                },
            }
        )
    # Africa first, so the page can draw context land beneath it in one pass.
    features.sort(key=lambda f: (f["properties"]["africa"], f["properties"]["name"]))
    africa_boxes = [f["bbox"] for f in features if f["properties"]["africa"]]
    return {
        "type": "FeatureCollection",
        "source": "Natural Earth (public domain) via world-atlas (ISC); generated by tools/make_basemap.py",
        "bbox": [
            min(b[0] for b in africa_boxes),
            min(b[1] for b in africa_boxes),
            max(b[2] for b in africa_boxes),
            max(b[3] for b in africa_boxes),
        ],
        "features": features,
    }


def dump(data: dict[str, Any]) -> bytes:
    try:
        import orjson
    except ImportError:  # the stdlib is enough; orjson is only faster
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
    return orjson.dumps(data)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        usage="%(prog)s --source FILE [--out OUT] [--tolerance DEG] [--context-tolerance DEG] [--digits N]",
    )
    parser.add_argument("--source", type=Path, default=None, metavar="FILE", help=f"required: {SOURCE_HELP}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write basemap.json")
    parser.add_argument("--tolerance", type=float, default=0.01, help="simplification, degrees (Africa)")
    parser.add_argument("--context-tolerance", type=float, default=0.03, help="simplification, degrees (context)")
    parser.add_argument("--digits", type=int, default=3, help="decimal places kept in coordinates")
    args = parser.parse_args(argv)
    if args.source is None:
        parser.error(f"--source is required: {SOURCE_HELP}")
    if not args.source.is_file():
        print(f"make_basemap: no such file {args.source}; --source takes {SOURCE_HELP}", file=sys.stderr)
        return 2
    topology = json.loads(args.source.read_bytes())
    data = build(topology, tolerance=args.tolerance, context_tolerance=args.context_tolerance, digits=args.digits)
    blob = dump(data)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(blob)
    count = sum(1 for f in data["features"] if f["properties"]["africa"])
    points = sum(len(r) for f in data["features"] for p in f["geometry"]["coordinates"] for r in p)
    print(
        f"wrote {args.out}: {len(blob) // 1024} KiB, {count} African features, "
        f"{len(data['features']) - count} context features, {points} points"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where a country is, roughly: a centroid and a radius per ISO 3166-1 alpha-2 code, and distances.

Sessions carry only the country they were geolocated to (no city, no coordinates), so two sessions can
be at most as precise as their countries. A country is taken as a disc around its approximate
geographic centroid with the radius of a disc of the country's land area (``sqrt(area / pi)``). The
*least* distance two sessions can be apart is then the distance between the centroids less both radii
(never below zero): neighbouring countries give 0, so that crossing a border is never "impossible
travel", while Paris and Sydney stay about 16,000 km apart. For very elongated countries (Chile,
Norway) the disc understates the spread, which errs on the side of no alarm.

The table covers the ~100 countries with the most streaming subscribers; centroids are rounded to a
tenth of a degree and areas to three significant figures (public gazetteer values). A country not in
the table is unknown: no distance, no travel anomaly (the caller counts it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

EARTH_RADIUS_KM = 6371.0088


@dataclass(frozen=True, slots=True)
class Country:
    code: str
    lat: float
    lon: float
    area_km2: float

    @property
    def radius_km(self) -> float:
        return math.sqrt(self.area_km2 / math.pi)


# code: (latitude, longitude, area in km²)
_TABLE: dict[str, tuple[float, float, float]] = {
    "AE": (23.9, 54.3, 83_600),
    "AR": (-35.4, -65.2, 2_780_000),
    "AT": (47.6, 14.1, 83_900),
    "AU": (-25.7, 134.5, 7_690_000),
    "BD": (23.8, 90.3, 148_000),
    "BE": (50.6, 4.6, 30_700),
    "BG": (42.8, 25.2, 111_000),
    "BO": (-16.7, -64.7, 1_100_000),
    "BR": (-10.8, -53.1, 8_520_000),
    "CA": (61.4, -98.3, 9_980_000),
    "CH": (46.8, 8.2, 41_300),
    "CL": (-37.7, -71.5, 756_000),
    "CN": (36.6, 103.8, 9_600_000),
    "CO": (3.9, -73.1, 1_140_000),
    "CR": (9.9, -84.2, 51_100),
    "CY": (35.0, 33.2, 9_250),
    "CZ": (49.7, 15.3, 78_900),
    "DE": (51.1, 10.4, 357_000),
    "DK": (56.0, 10.0, 42_900),
    "DO": (18.9, -70.5, 48_700),
    "DZ": (28.2, 2.6, 2_380_000),
    "EC": (-1.4, -78.4, 256_000),
    "EE": (58.7, 25.5, 45_300),
    "EG": (26.5, 29.9, 1_000_000),
    "ES": (40.2, -3.6, 506_000),
    "FI": (64.5, 26.3, 338_000),
    "FR": (46.6, 2.4, 552_000),
    "GB": (54.1, -2.9, 244_000),
    "GH": (7.9, -1.2, 239_000),
    "GR": (39.1, 22.9, 132_000),
    "GT": (15.7, -90.4, 109_000),
    "HK": (22.4, 114.1, 1_110),
    "HN": (14.8, -86.6, 112_000),
    "HR": (45.1, 16.4, 56_600),
    "HU": (47.2, 19.4, 93_000),
    "ID": (-2.2, 117.3, 1_900_000),
    "IE": (53.2, -8.2, 70_300),
    "IL": (31.0, 34.9, 22_100),
    "IN": (22.9, 79.6, 3_290_000),
    "IQ": (33.0, 43.7, 438_000),
    "IS": (65.0, -18.6, 103_000),
    "IT": (42.8, 12.1, 301_000),
    "JM": (18.2, -77.3, 11_000),
    "JO": (31.2, 36.3, 89_300),
    "JP": (37.6, 138.0, 378_000),
    "KE": (0.5, 37.8, 580_000),
    "KR": (36.4, 127.8, 100_000),
    "KW": (29.3, 47.6, 17_800),
    "KZ": (48.2, 67.3, 2_720_000),
    "LB": (33.9, 35.9, 10_500),
    "LK": (7.6, 80.7, 65_600),
    "LT": (55.3, 23.9, 65_300),
    "LU": (49.8, 6.1, 2_590),
    "LV": (56.9, 24.9, 64_600),
    "MA": (31.9, -6.3, 447_000),
    "MT": (35.9, 14.4, 316),
    "MX": (23.9, -102.5, 1_960_000),
    "MY": (3.8, 109.7, 330_000),
    "NG": (9.6, 8.1, 924_000),
    "NI": (12.8, -85.0, 130_000),
    "NL": (52.2, 5.5, 41_900),
    "NO": (64.6, 12.7, 324_000),
    "NZ": (-41.8, 172.8, 268_000),
    "OM": (20.6, 56.1, 310_000),
    "PA": (8.5, -80.1, 75_400),
    "PE": (-9.2, -74.4, 1_290_000),
    "PH": (11.8, 122.9, 300_000),
    "PK": (29.9, 69.4, 882_000),
    "PL": (52.1, 19.4, 313_000),
    "PR": (18.2, -66.5, 9_100),
    "PT": (39.6, -8.0, 92_200),
    "PY": (-23.2, -58.4, 407_000),
    "QA": (25.3, 51.2, 11_600),
    "RO": (45.9, 25.0, 238_000),
    "RS": (44.2, 20.8, 77_500),
    "RU": (61.5, 97.7, 17_100_000),
    "SA": (24.1, 44.5, 2_150_000),
    "SE": (62.8, 16.7, 450_000),
    "SG": (1.4, 103.8, 728),
    "SI": (46.1, 14.8, 20_300),
    "SK": (48.7, 19.5, 49_000),
    "SV": (13.7, -88.9, 21_000),
    "TH": (15.1, 101.0, 513_000),
    "TN": (34.1, 9.6, 164_000),
    "TR": (39.1, 35.2, 784_000),
    "TT": (10.5, -61.3, 5_130),
    "TW": (23.8, 121.0, 36_200),
    "UA": (49.0, 31.4, 604_000),
    "US": (39.8, -98.6, 9_830_000),
    "UY": (-32.8, -56.0, 176_000),
    "VE": (7.1, -66.2, 916_000),
    "VN": (16.6, 106.3, 331_000),
    "ZA": (-29.0, 25.1, 1_220_000),
}

COUNTRIES: dict[str, Country] = {
    code: Country(code, lat, lon, area) for code, (lat, lon, area) in _TABLE.items()
}


def country(code: str | None) -> Country | None:
    """The table's entry for an ISO alpha-2 code (any case), or None."""
    if not code:
        return None
    return COUNTRIES.get(code.strip().upper())


def great_circle_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Haversine distance in km."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


def least_distance_km(a: Country, b: Country) -> float:
    """The least distance between a point in ``a`` and a point in ``b`` (0 for the same country)."""
    if a.code == b.code:
        return 0.0
    centres = great_circle_km(a.lat, a.lon, b.lat, b.lon)
    return max(0.0, centres - a.radius_km - b.radius_km)

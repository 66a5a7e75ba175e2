"""The Open Connect appliances playback may steer to, declared in a YAML or JSON file.

```yaml
appliances:
  - id: oca-isp1-01                      # the id ApplianceHealth/ApplianceContents events carry
    base_url: https://oca-isp1-01.example.net
    kind: embedded                       # inside an ISP: serves that ISP's client prefixes
    prefixes: [198.51.100.0/24, 2001:db8:100::/48]
  - id: oca-ams-ix-01
    base_url: https://oca-ams-ix-01.example.net
    kind: ixp                            # at an internet exchange point: serves everyone
    site: ams
```
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, ValidationError, model_validator

Network = IPv4Network | IPv6Network


@dataclass(frozen=True)
class Appliance:
    id: str
    base_url: str
    kind: Literal["embedded", "ixp"]
    prefixes: tuple[Network, ...] = ()
    site: str | None = None


class ApplianceConfigError(ValueError):
    """The appliances file is missing or invalid; the message says where."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Embedded(_Strict):
    id: str = Field(min_length=1, max_length=200)
    base_url: AnyHttpUrl
    kind: Literal["embedded"]
    prefixes: list[IPv4Network | IPv6Network] = Field(min_length=1)
    site: str | None = None


class _Ixp(_Strict):
    id: str = Field(min_length=1, max_length=200)
    base_url: AnyHttpUrl
    kind: Literal["ixp"]
    site: str = Field(min_length=1)


class _File(_Strict):
    appliances: list[Annotated[_Embedded | _Ixp, Field(discriminator="kind")]]

    @model_validator(mode="after")
    def _unique_ids(self) -> _File:
        seen: set[str] = set()
        for item in self.appliances:
            if item.id in seen:
                raise ValueError(f"appliance id {item.id!r} is declared twice")
            seen.add(item.id)
        return self


def parse_appliances(data: Any) -> tuple[Appliance, ...]:
    try:
        parsed = _File.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ApplianceConfigError(f"{where}: {first['msg']}" if where else first["msg"]) from None
    result: list[Appliance] = []
    for item in parsed.appliances:
        base_url = str(item.base_url).rstrip("/")
        if isinstance(item, _Embedded):
            result.append(Appliance(item.id, base_url, "embedded", tuple(item.prefixes), item.site))
        else:
            result.append(Appliance(item.id, base_url, "ixp", (), item.site))
    return tuple(result)


def load_appliances(path: Path) -> tuple[Appliance, ...]:
    """Read and validate the file (``.json`` as JSON, anything else as YAML)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ApplianceConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    is_json = path.suffix.lower() == ".json"
    try:
        data = json.loads(text) if is_json else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ApplianceConfigError(f"{path} is not valid {'JSON' if is_json else 'YAML'}: {exc}") from None
    try:
        return parse_appliances(data)
    except ApplianceConfigError as exc:
        raise ApplianceConfigError(f"{path}: {exc}") from None

"""A small client for the Confluent-compatible schema registry API (Apicurio's ``/apis/ccompat/v7``).

Blocking on purpose: it is called at start-up, by the CLI, and (through ``asyncio.to_thread``) the
first time a consumer meets an unknown schema id. The hot paths never call it: ids are cached.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


class RegistryError(RuntimeError):
    """The registry answered with an error."""

    def __init__(self, status: int, message: str, error_code: int | None = None) -> None:
        super().__init__(f"schema registry: HTTP {status}: {message}")
        self.status = status
        self.error_code = error_code


class RegistryUnavailable(RuntimeError):
    """The registry did not answer: retry later."""


@dataclass(frozen=True)
class RegisteredSchema:
    subject: str
    version: int
    id: int
    schema: Any


class RegistryClient:
    def __init__(self, url: str, timeout: float = 5.0, attempts: int = 3) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.attempts = attempts

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        """One call, tried up to ``attempts`` times while the registry does not answer (a JVM pause
        on a busy machine outlasts one timeout). Every call is safe to repeat: the reads, and the
        registrations, which give a schema registered twice the same id."""
        for attempt in range(1, self.attempts + 1):
            try:
                return self._call_once(method, path, body)
            except RegistryUnavailable:
                if attempt == self.attempts:
                    raise
                time.sleep(0.5 * attempt)
        raise AssertionError("unreachable")

    def _call_once(self, method: str, path: str, body: Any) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": CONTENT_TYPE, "Accept": CONTENT_TYPE},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            try:
                payload = json.loads(text)
                message = str(payload.get("message") or payload.get("detail") or text)
                code = payload.get("error_code")
            except ValueError:
                message, code = text, None
            raise RegistryError(exc.code, message, code if isinstance(code, int) else None) from None
        except (urllib.error.URLError, OSError) as exc:
            raise RegistryUnavailable(f"schema registry at {self.url} did not answer: {exc}") from exc
        return json.loads(raw) if raw else None

    @staticmethod
    def _q(subject: str) -> str:
        return urllib.parse.quote(subject, safe="")

    def subjects(self) -> list[str]:
        return list(self._call("GET", "/subjects"))

    def register(self, subject: str, schema: Any) -> int:
        body = {"schema": json.dumps(schema), "schemaType": "AVRO"}
        return int(self._call("POST", f"/subjects/{self._q(subject)}/versions", body)["id"])

    def lookup(self, subject: str, schema: Any) -> RegisteredSchema | None:
        """The registered version of exactly this schema under ``subject``, or None."""
        body = {"schema": json.dumps(schema), "schemaType": "AVRO"}
        try:
            found = self._call("POST", f"/subjects/{self._q(subject)}", body)
        except RegistryError as exc:
            if exc.status == 404:
                return None
            raise
        return RegisteredSchema(subject, int(found["version"]), int(found["id"]), json.loads(found["schema"]))

    def schema_by_id(self, schema_id: int) -> Any:
        return json.loads(self._call("GET", f"/schemas/ids/{schema_id}")["schema"])

    def versions(self, subject: str) -> list[int]:
        try:
            return [int(v) for v in self._call("GET", f"/subjects/{self._q(subject)}/versions")]
        except RegistryError as exc:
            if exc.status == 404:
                return []
            raise

    def version(self, subject: str, version: int) -> RegisteredSchema:
        found = self._call("GET", f"/subjects/{self._q(subject)}/versions/{version}")
        return RegisteredSchema(subject, int(found["version"]), int(found["id"]), json.loads(found["schema"]))

    def compatibility(self, subject: str) -> str | None:
        try:
            found = self._call("GET", f"/config/{self._q(subject)}")
        except RegistryError as exc:
            if exc.status == 404:
                return None
            raise
        level = found.get("compatibilityLevel") or found.get("compatibility")
        return str(level) if level else None

    def set_compatibility(self, subject: str, level: str) -> None:
        self._call("PUT", f"/config/{self._q(subject)}", {"compatibility": level})

    def is_compatible(self, subject: str, schema: Any) -> bool:
        body = {"schema": json.dumps(schema), "schemaType": "AVRO"}
        path = f"/compatibility/subjects/{self._q(subject)}/versions/latest"
        try:
            return bool(self._call("POST", path, body)["is_compatible"])
        except RegistryError as exc:
            if exc.status == 404:  # no versions yet: anything goes
                return True
            raise

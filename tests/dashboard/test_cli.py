"""``reelbus dashboard``: the page's address with an ``ops:read`` token in its fragment."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest

from services.bus.auth import TokenVerifier, generate_key_pair, load_public_key
from services.cli.main import main


def test_the_command_prints_the_page_with_an_operator_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REELBUS_HOME", str(tmp_path))
    _, public = generate_key_pair(tmp_path / "keys")
    assert main(["dashboard", "--gateway", "http://gw.example:8080/", "--hours", "1"]) == 0
    url = urlsplit(capsys.readouterr().out.strip())
    assert (url.scheme, url.netloc, url.path, url.query) == ("http", "gw.example:8080", "/dashboard/", "")
    name, _, token = url.fragment.partition("=")
    assert name == "token"
    claims = TokenVerifier(load_public_key(public)).verify(token)
    assert "ops:read" in claims.scopes


def test_without_keys_it_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REELBUS_HOME", str(tmp_path))
    assert main(["dashboard"]) == 2
    assert "reelbus up" in capsys.readouterr().err

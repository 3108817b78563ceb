"""Tokens for real deployments (drivers.tokens): minted tokens pass the hub's own check, token files."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from drivers import run as run_module
from drivers.tokens import TokenSource
from im_actors.auth import verify_token, verify_token_expiry
from im_actors.config import load_config
from im_actors.errors import CloseConnection


def test_hs256_tokens_pass_the_deployments_check() -> None:
    secret = secrets.token_hex(32)
    cfg = load_config(jwt_secret=secret, jwt_audience="im", jwt_issuer="idp")
    src = TokenSource(secret=secret, audience="im", issuer="idp", ttl_s=600)
    token = src.token_for("alice", now=1_900_000_000)
    assert token is not None
    with pytest.raises(CloseConnection):  # minted at a fixed time long past: expired now
        verify_token(cfg, token)
    user, exp = verify_token_expiry(cfg, src.token_for("alice") or "")
    assert user == "alice" and exp > 0
    with pytest.raises(CloseConnection):  # another deployment's secret refuses it
        verify_token(load_config(jwt_secret=secrets.token_hex(32)), src.token_for("alice") or "")


@pytest.mark.parametrize("curve", [False, True])
def test_key_file_tokens_pass_the_deployments_check(tmp_path: Path, curve: bool) -> None:
    key = ec.generate_private_key(ec.SECP256R1()) if curve else rsa.generate_private_key(65537, 2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "key.pem").write_bytes(pem)
    src = TokenSource.from_key_file(tmp_path / "key.pem")
    assert src.algorithm == ("ES256" if curve else "RS256")
    if not curve:  # the deployment verifies RS256 with its public key
        cfg = load_config(jwt_algorithm="RS256", jwt_public_key=public.decode())
        assert verify_token(cfg, src.token_for("bob") or "") == "bob"
    (tmp_path / "public.pem").write_bytes(public)
    with pytest.raises(ValueError, match="not a PEM private key"):
        TokenSource.from_key_file(tmp_path / "public.pem")


def test_token_files_in_both_forms(tmp_path: Path) -> None:
    (tmp_path / "t.json").write_text(json.dumps({"p.s0": "tok0", "p.s1": "tok1"}))
    (tmp_path / "t.txt").write_text("# users\np.s0 tok0\n\np.s1   tok1\n")
    for name in ("t.json", "t.txt"):
        src = TokenSource.from_token_file(tmp_path / name)
        assert (src.token_for("p.s0"), src.token_for("p.s1")) == ("tok0", "tok1")
        with pytest.raises(KeyError, match="no token for user 'p.s2'"):
            src.token_for("p.s2")
    (tmp_path / "bad.txt").write_text("p.s0\n")
    with pytest.raises(ValueError, match=r"bad.txt:1: expected"):
        TokenSource.from_token_file(tmp_path / "bad.txt")


def test_dev_login_is_the_default_and_bad_combinations_are_refused() -> None:
    assert TokenSource().dev_login and TokenSource().token_for("x") is None
    with pytest.raises(ValueError, match="not both"):
        TokenSource(secret="s" * 32, private_key="k")
    with pytest.raises(ValueError, match="HS256"):
        TokenSource(secret="s" * 32, algorithm="RS256")


def test_drivers_run_flags(tmp_path: Path) -> None:
    parse = run_module._parser().parse_args
    src = run_module._tokens(parse(["--router", "http://x", "--jwt-secret", "s" * 32, "synthetic"]))
    assert src.secret == "s" * 32 and src.algorithm == "HS256" and not src.dev_login
    (tmp_path / "t.txt").write_text("u.s0 tok\n")
    with pytest.raises(ValueError, match="--user-prefix"):
        run_module._tokens(parse(["--router", "http://x", "--token-file", str(tmp_path / "t.txt"), "synthetic"]))
    with pytest.raises(SystemExit) as exc:
        run_module.main(["--router", "http://x", "--jwt-secret", "s" * 32, "--jwt-key", "k.pem", "synthetic"])
    assert exc.value.code == 2

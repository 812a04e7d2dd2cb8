"""No secret in any output: presigned S3 URLs (with a session token) and ``user:password@`` URLs in a list file are
read with their credentials, and recorded without them, everywhere: sample records, manifest, quarantine, stats,
config, logs. A re-signed URL of the same object is the same source (same sample keys; nothing to redo).

Real parts: moto's S3 server on loopback signing and serving the objects, an HTTP server on loopback that demands
basic auth and serves byte ranges, the real preprocessing job on a local Ray, real mp4 files.
"""

from __future__ import annotations

import base64
import json
import logging
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import fsspec
import pytest

from jobs.preprocess import main
from tvlt_core import shards
from tvlt_core.redaction import REDACTED, is_secret_name, public_uri, redact, redact_text

TINY = ["--config", "preprocess_tiny", "--mode", "pretrain", "--audio.missing", "silent"]
SESSION_TOKEN = "FwoGZXIvYXdzEXAMPLESESSIONTOKENvalue"
SIGNER_KEY_ID = "AKIDPRESIGNEXAMPLE01"
SIGNER_SECRET = "presign-secret-never-written"
HTTP_USER, HTTP_PASSWORD = "reader", "basic-auth-s3cr3t"


# --- redaction rules --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, secret", [
    ("https://b.s3.amazonaws.com/v.mp4?X-Amz-Credential=AKIA123%2F20261202&X-Amz-Signature=beef", "AKIA123"),
    ("https://b.s3.amazonaws.com/v.mp4?X-Amz-Security-Token=FwoGZXIv&X-Amz-Signature=beef", "FwoGZXIv"),
    ("https://acct.blob.core.windows.net/c/v.mp4?sv=2022-11-02&sp=r&sig=abc%2Bdef", "abc%2Bdef"),
    ("https://ghp_T0KEN123@github.com/org/repo", "ghp_T0KEN123"),
    ("s3://ak:pa/ss@minio:9000/bucket/key", "pa/ss"),
    ("s3://ak:p@ss@minio:9000/bucket/key", "p@ss"),
    ("error opening 'https://cdn/x.mp4?Policy=pol1&Signature=sig1&Key-Pair-Id=kp1': 403", "sig1"),
])  # fmt: skip
def test_redact_text_masks_url_credentials(text, secret):
    assert secret not in redact_text(text)
    assert REDACTED in redact_text(text)


def test_redaction_leaves_what_is_not_a_secret():
    assert redact_text("s3://bucket/path/a@b.mp4") == "s3://bucket/path/a@b.mp4"
    assert redact_text("s3://bucket/v.mp4?versionId=abc") == "s3://bucket/v.mp4?versionId=abc"
    assert redact({"text": {"tokenizer": "work/vocab"}, "monkey": "m"}) == {"text": {"tokenizer": "work/vocab"},
                                                                           "monkey": "m"}
    assert not is_secret_name("text.tokenizer") and not is_secret_name("sources.uri_column")
    assert all(is_secret_name(n) for n in ("auth_token", "MLFLOW_TRACKING_TOKEN", "secretAccessKey", "api_key"))


def test_list_valued_secret_settings_are_masked():
    assert redact({"api_keys": ["k1", "k2"], "urls": ["s3://u:pw@h/x"]}) == {"api_keys": [REDACTED, REDACTED],
                                                                          "urls": [f"s3://u:{REDACTED}@h/x"]}


def test_public_uri_is_the_objects_identity_without_credentials():
    signed = "https://h/b/v.mp4?versionId=7&X-Amz-Algorithm=AWS4&X-Amz-Signature=beef&X-Amz-Security-Token=t"
    assert public_uri(signed) == "https://h/b/v.mp4?versionId=7"
    assert public_uri(signed.replace("beef", "cafe")) == public_uri(signed)  # re-signed: the same source
    assert public_uri("https://u:pw@h/v.mp4") == public_uri("https://TOKEN@h/v.mp4") == "https://h/v.mp4"
    assert public_uri("https://acct.blob.core.windows.net/c/v.mp4?sv=1&se=2&sp=r&sig=x") == \
        "https://acct.blob.core.windows.net/c/v.mp4"
    assert public_uri("/data/v@1.mp4") == "/data/v@1.mp4"


# --- the job, on real signed URLs -------------------------------------------------------------------------------
class _RangeHandler(BaseHTTPRequestHandler):
    """Serves files of ``root`` to requests with the right basic-auth header, with byte ranges (as object stores
    and CDNs do, and as fsspec's HTTP reader needs for random access)."""

    root: Path
    expected = "Basic " + base64.b64encode(f"{HTTP_USER}:{HTTP_PASSWORD}".encode()).decode()

    def _file(self) -> Path | None:
        if self.headers.get("Authorization") != self.expected:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="videos"')
            self.end_headers()
            return None
        path = self.root / urlsplit(self.path).path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return None
        return path

    def do_HEAD(self):  # noqa: N802
        if (path := self._file()) is not None:
            self.send_response(200)
            self.send_header("Content-Length", str(path.stat().st_size))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()

    def do_GET(self):  # noqa: N802
        if (path := self._file()) is None:
            return
        data = path.read_bytes()
        start, end = 0, len(data) - 1
        if rng := self.headers.get("Range"):
            first, last = rng.removeprefix("bytes=").split("-")
            start, end = int(first or 0), min(int(last) if last else len(data) - 1, len(data) - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.wfile.write(data[start:end + 1])

    def log_message(self, *args):  # keep test output to the job's
        pass


@pytest.fixture
def basic_auth_server(tmp_path):
    root = tmp_path / "http-root"
    root.mkdir()
    handler = type("Handler", (_RangeHandler,), {"root": root})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _signed_urls(s3_endpoint: str, keys: list[str], expires: int, version: str) -> list[str]:
    """Presigned GET URLs with a session token: ``s3v4`` (X-Amz-Credential, X-Amz-Signature, X-Amz-Security-Token)
    or ``s3`` (SigV2: AWSAccessKeyId, Signature, x-amz-security-token)."""
    signer = fsspec.filesystem("s3", key=SIGNER_KEY_ID, secret=SIGNER_SECRET, token=SESSION_TOKEN,
                               client_kwargs={"endpoint_url": s3_endpoint}, config_kwargs={"signature_version": version},
                               skip_instance_cache=True)
    return [signer.sign(f"signed/{k}", expiration=expires) for k in keys]


def _secrets_of(urls: list[str]) -> set[str]:
    found = {SESSION_TOKEN, SIGNER_KEY_ID, SIGNER_SECRET, HTTP_PASSWORD}
    for url in urls:
        for name, values in parse_qs(urlsplit(url).query).items():
            if name.lower() in ("x-amz-signature", "x-amz-credential", "x-amz-security-token", "signature"):
                found.update(values)
    return found


def _every_output_byte(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def test_signed_and_userinfo_urls_leave_no_secret_in_any_output(ray_cluster, synthetic_corpus, s3_endpoint,
                                                                basic_auth_server, tmp_path, caplog, capsys):
    caplog.set_level(logging.ERROR, logger="werkzeug")  # moto's access log prints the URLs it serves: not ours
    fs = fsspec.filesystem("s3", key="test", secret="test", client_kwargs={"endpoint_url": s3_endpoint},
                           skip_instance_cache=True)
    fs.mkdir("signed")
    videos = [v for v in synthetic_corpus.videos if v["kind"] == "pretrain"][:3]
    names = [Path(v["path"]).name for v in videos]
    for video, name in zip(videos[:2], names[:2]):
        fs.put_file(str(synthetic_corpus.path(video)), f"signed/{name}")
    http_root, http_base = basic_auth_server
    (http_root / names[2]).write_bytes(synthetic_corpus.path(videos[2]).read_bytes())
    host = http_base.removeprefix("http://")
    userinfo_url = f"http://{HTTP_USER}:{HTTP_PASSWORD}@{host}/{names[2]}"
    missing_url = f"http://{HTTP_USER}:{HTTP_PASSWORD}@{host}/gone.mp4"

    def run(signed: list[str]) -> int:
        listing = tmp_path / "videos.jsonl"
        listing.write_text("".join(json.dumps({"uri": u}) + "\n" for u in [*signed, userinfo_url, missing_url]))
        return main([*TINY, "--input", str(listing), "--output", str(out)])

    out = tmp_path / "shards"
    first = _signed_urls(s3_endpoint, names[:2], expires=3600, version="s3v4")
    assert SESSION_TOKEN in first[0] and "X-Amz-Signature" in first[0], first[0]
    assert run(first) == 0
    manifest = shards.Manifest.from_json((out / "manifest.json").read_text())
    sources = {u: e["status"] for u, e in manifest.sources.items()}
    assert sources == {f"{s3_endpoint}/signed/{names[0]}": "ok", f"{s3_endpoint}/signed/{names[1]}": "ok",
                       f"{http_base}/{names[2]}": "ok", f"{http_base}/gone.mp4": "quarantined"}, sources
    samples = {}
    for url in shards.shard_urls(str(out)):
        with tarfile.open(url) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    record = json.loads(tar.extractfile(member).read())
                    samples[record["key"]] = record["uri"]
    assert set(samples.values()) == set(sources) - {f"{http_base}/gone.mp4"}

    second = _signed_urls(s3_endpoint, names[:2], expires=7200, version="s3")  # re-signed, SigV2: same objects
    assert "Signature=" in second[0] and SESSION_TOKEN in second[0], second[0]
    assert run(second) == 0
    again = shards.Manifest.from_json((out / "manifest.json").read_text())
    assert again.generation == manifest.generation, "a re-signed URL is the same source: nothing to redo"
    assert set(again.sources) == set(manifest.sources)

    written = _every_output_byte(out)
    printed = capsys.readouterr()
    logs = (printed.out + printed.err + caplog.text).encode()
    for secret in _secrets_of(first + second):
        assert secret.encode() not in written, f"{secret!r} is in the output folder"
        assert secret.encode() not in logs, f"{secret!r} is in the logs"

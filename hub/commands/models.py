"""``edge-hub models push|list|show|pull|rm|quantize``: the ML engineer's side of the registry.

``push`` sends an ONNX file with its manifest (by default the ``.json`` next to the file) and,
with ``--sign KEY``, an ed25519 signature made locally: the private key never leaves this
machine. ``pull`` downloads a version, resuming a partial ``.part`` file with a Range request,
and checks the sha256 (and the signature with ``--verify-key``). Usage errors exit 2, refusals
by the hub exit 1, an unreachable hub exits 3. ``quantize`` (``hub.commands.quantize``) pulls a
version, makes and measures its INT8 twin locally and pushes it with the report, which ``show``
prints.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import hdrs
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.common import cli
from hub.client import http
from hub.client.http import FilePayload, HubClient, client_from_args
from hub.client.output import (
    human_size,
    note,
    print_fields,
    print_json,
    print_table,
    progress_bar,
    say,
    short_time,
)
from hub.commands import quantize
from hub.errors import HubError, InvalidRequest
from hub.registry import signing
from hub.registry.service import (
    SignatureRejected,
    artifact_path,
    check_ref,
    manifest_path,
    version_path,
)

#: The manifest's name beside the model file, as models/build.py and the agent lay them out.
MANIFEST_FILE = "manifest.json"


class DigestMismatchError(HubError, code="digest_mismatch"):
    """Downloaded bytes whose sha256 is not the one the hub announced."""


def register(sub: Any) -> None:
    """Add ``models`` and its actions."""
    acts = cli.add_group(
        sub, "models", help="push, list, show, pull and delete model versions in the registry",
        description="Manage model versions in the hub's registry. " + http.CONNECTION_NOTE,
    )
    push = http.add_client_verb(acts, "push", _push, help="upload an ONNX model version")
    push.add_argument("file", type=Path, metavar="FILE", help="the .onnx file")
    push.add_argument("--name", required=True, help="model name (lowercase, digits, '-')")
    push.add_argument("--version", required=True, help="version string, e.g. 1.2.0")
    push.add_argument("--manifest", type=Path, metavar="M", help="manifest JSON")
    push.add_argument("--sign", type=Path, metavar="KEY", help="ed25519 private key (PEM)")
    push.add_argument("--notes", default="", help="free text stored with the version")
    push.add_argument("--pushed-by", default=None, help="who pushes (default user@host)")

    ls = http.add_client_verb(acts, "list", _list, help="list versions")
    ls.add_argument("--name", default=None, help="only this model's versions")

    show = http.add_client_verb(acts, "show", _show, help="one version in detail")
    show.add_argument("name")
    show.add_argument("version")

    pull = http.add_client_verb(acts, "pull", _pull,
                                help="download a version (resumable) and verify it")
    pull.add_argument("name")
    pull.add_argument("version")
    pull.add_argument("-o", "--output-dir", type=Path, default=None, metavar="DIR",
                      help="where to write the model file and manifest.json "
                      "(default ./NAME-VERSION)")
    pull.add_argument("--verify-key", type=Path, metavar="PUB", help="ed25519 public key (PEM)")

    rm = http.add_client_verb(acts, "rm", _rm, help="delete a version")
    rm.add_argument("name")
    rm.add_argument("version")

    quantize.register(acts, download=download, upload=upload)


# ------------------------------------------------------------------------------------ push


def _digest(path: Path) -> tuple[str, int]:
    """(sha256, size) of the file at ``path``, read in 1 MiB chunks; of nothing when there is
    no file (blocking)."""
    h = hashlib.sha256()
    n = 0
    if path.exists():
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                n += len(chunk)
    return h.hexdigest(), n


def _prepare_manifest(args: argparse.Namespace, file_sha: str) -> bytes:
    """The manifest bytes to send: the file's own bytes unless a field had to be set."""
    candidates = [args.manifest] if args.manifest else [
        args.file.with_suffix(".json"), args.file.parent / "manifest.json"
    ]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        looked = ", ".join(str(c) for c in candidates)
        raise InvalidRequest(f"no manifest: pass --manifest M (looked for {looked})")
    raw: bytes = path.read_bytes()
    try:
        data: Any = json.loads(raw)
    except ValueError as exc:
        raise InvalidRequest(f"manifest {path} is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidRequest(f"manifest {path} is not a JSON object")
    wanted = {"name": args.name, "version": args.version}
    if "sha256" not in data:
        wanted["sha256"] = file_sha
    if "file" not in data:
        wanted["file"] = args.file.name
    changed = {k: v for k, v in wanted.items() if data.get(k) != v}
    if not changed:
        return raw
    for k in ("name", "version"):
        if k in changed and k in data:
            note(f"note: manifest {k} {data[k]!r} replaced by {changed[k]!r}")
    data.update(changed)
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode()


async def _push(args: argparse.Namespace) -> int:
    """Upload FILE as NAME VERSION. The manifest defaults to FILE with a .json suffix, else
    manifest.json beside FILE; its name and version are set to --name and --version, and its
    sha256 is filled in when missing. The hub refuses a file that does not load in onnxruntime
    or does not match its manifest."""
    status, body = await upload(args)
    if args.json:
        print_json(body)
    else:
        what = "pushed" if status == 201 else "already present (identical)"
        say(f"{what}: {body['name']} {body['version']} sha256={body['sha256']} "
              f"size={human_size(body['size'])} signed={str(body['signed']).lower()}")
    return 0


async def upload(args: argparse.Namespace, *,
                 quantization: str | None = None) -> tuple[int, dict[str, Any]]:
    """``push``'s upload (``args``: file, name, version, manifest, sign, notes, pushed_by and
    the connection flags); (HTTP status, the version as the hub stored it). ``quantization``
    is an INT8 version's report (JSON), sent as its own part (``models quantize``)."""
    check_ref(args.name, args.version)
    client = client_from_args(args)
    if not args.file.is_file():
        raise InvalidRequest(f"no such file: {args.file}")
    key = signing.load_private_key(args.sign) if args.sign else None
    size = args.file.stat().st_size
    file_sha, _ = await asyncio.to_thread(_digest, args.file)
    manifest = _prepare_manifest(args, file_sha)
    pushed_by = args.pushed_by or f"{getpass.getuser()}@{socket.gethostname()}"

    with progress_bar(size, f"push {args.name} {args.version}") as advance:
        form = aiohttp.MultipartWriter("form-data")
        part = form.append(manifest, {hdrs.CONTENT_TYPE: "application/json"})
        part.set_content_disposition("form-data", name="manifest")
        fields = {"pushed_by": pushed_by, "notes": args.notes, "quantization": quantization}
        if key is not None:
            fields["signature"] = signing.sign(
                key, hashlib.sha256(manifest).hexdigest(), file_sha
            )
        for name, value in fields.items():
            if value:
                form.append(value).set_content_disposition("form-data", name=name)
        payload = FilePayload(args.file, size, advance)
        payload.set_content_disposition("form-data", name="artifact", filename=args.file.name)
        form.append_payload(payload)
        async with client as hub:
            status, body = await hub.request_json(
                "PUT", version_path(args.name, args.version), data=form, expect100=True
            )
    return status, body


# ----------------------------------------------------------------------------- list/show/rm


async def _list(args: argparse.Namespace) -> int:
    """List model versions."""
    query = {"name": args.name} if args.name else None
    async with client_from_args(args) as hub:
        _, body = await hub.request_json("GET", "/v1/models", params=query)
    if args.json:
        print_json(body)
        return 0
    rows = [
        (v["name"], v["version"], v["task"], human_size(v["size"]), v["sha256"][:12],
         "yes" if v["signed"] else "no", short_time(v["created_at"]), v["pushed_by"])
        for v in body["versions"]
    ]
    if not rows:
        note("no model versions")
        return 0
    print_table(("NAME", "VERSION", "TASK", "SIZE", "SHA256", "SIGNED", "CREATED", "PUSHED BY"),
                rows)
    return 0


async def _on_version(args: argparse.Namespace, method: str) -> Any:
    """The hub's answer to ``method`` on the version ``args`` name."""
    check_ref(args.name, args.version)
    async with client_from_args(args) as hub:
        _, body = await hub.request_json(method, version_path(args.name, args.version))
    return body


async def _show(args: argparse.Namespace) -> int:
    """Show a version."""
    v = await _on_version(args, "GET")
    if args.json:
        print_json(v)
        return 0
    m = v["manifest"]
    inp = m.get("input", {})
    print_fields([
        ("name", v["name"]),
        ("version", v["version"]),
        ("task", v["task"]),
        ("size", f"{human_size(v['size'])} ({v['size']} bytes)"),
        ("sha256", v["sha256"]),
        ("manifest sha256", v["manifest_sha256"]),
        ("signed", "yes" if v["signature"] else "no"),
        ("created", v["created_at"]),
        ("pushed by", v["pushed_by"]),
        ("notes", v["notes"]),
        ("input", f"{inp.get('name')} {inp.get('layout')} {inp.get('width')}x"
                  f"{inp.get('height')} batch={inp.get('batch', 1)}"),
        ("outputs", ", ".join(f"{o['name']}{o['shape']}" for o in m.get("outputs", []))),
        ("labels", len(m.get("labels", []))),
        ("artifact", v["artifact_url"]),
        *(quantize.report_fields(v["quantization"]) if v.get("quantization") else []),
    ])
    return 0


async def _rm(args: argparse.Namespace) -> int:
    """Delete a version. The hub refuses while any node is assigned it."""
    body = await _on_version(args, "DELETE")
    if args.json:
        print_json(body)
    else:
        say(f"deleted: {args.name} {args.version}")
    return 0


# ------------------------------------------------------------------------------------- pull


def _partial_size(part: Path, size: int) -> int:
    """Bytes of an earlier partial download to resume from (0 when none or unusable)."""
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    if have > size:
        part.unlink()
        return 0
    return have


def _install(part: Path, target: Path, manifest_bytes: bytes) -> None:
    os.replace(part, target)
    (target.parent / MANIFEST_FILE).write_bytes(manifest_bytes)


async def _pull(args: argparse.Namespace) -> int:
    """Download the artifact and manifest.json of NAME VERSION into DIR, resuming a partial
    download, checking the sha256 and, with --verify-key, the signature."""
    result = await download(args, args.output_dir or Path(f"{args.name}-{args.version}"))
    if args.json:
        print_json(result)
    else:
        say(f"pulled: {result['path']} sha256={result['sha256']} size={human_size(result['size'])}"
              + (" (resumed)" if result["resumed"] else "")
              + (" signature ok" if result["signature_verified"] else ""))
    return 0


async def download(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """``pull``'s download of NAME VERSION (``args``: name, version, verify_key and the
    connection flags) into ``out``; what was written (path, manifest, sha256, size, resumed,
    signature_verified)."""
    check_ref(args.name, args.version)
    pub = signing.load_public_key(args.verify_key) if args.verify_key else None
    async with client_from_args(args) as hub:
        _, v = await hub.request_json("GET", version_path(args.name, args.version))
        file_name = str(v["manifest"].get("file") or f"{args.name}-{args.version}.onnx")
        if Path(file_name).name != file_name or file_name in (".", ".."):
            raise DigestMismatchError(f"the hub sent an unsafe file name {file_name!r}")
        target, part = out / file_name, out / (file_name + ".part")
        resumed = await _download(hub, args, v, part)
        _, manifest_bytes = await hub.request("GET", manifest_path(args.name, args.version))
    sha, n = await asyncio.to_thread(_check_download, part, v, manifest_bytes)
    verified = _check_signature(pub, v, manifest_bytes, sha)
    await asyncio.to_thread(_install, part, target, manifest_bytes)
    return {"path": str(target), "manifest": str(target.parent / MANIFEST_FILE),
            "sha256": sha, "size": n, "resumed": resumed, "signature_verified": verified}


async def _download(hub: HubClient, args: argparse.Namespace, v: dict[str, Any],
                    part: Path) -> bool:
    """Fetch the artifact into ``part``, resuming an earlier partial download; whether the
    hub resumed it (206) or the file was already whole."""
    have = await asyncio.to_thread(_partial_size, part, int(v["size"]))
    if have >= v["size"]:
        return have > 0
    headers = {"Range": f"bytes={have}-", "If-Range": f'"{v["sha256"]}"'} if have else None

    def on_start(resp: aiohttp.ClientResponse) -> bool:
        return resp.status == 206

    with progress_bar(v["size"], f"pull {args.name} {args.version}") as advance:
        if advance is not None and have:
            advance(have)
        resp = await hub.download(
            artifact_path(args.name, args.version), part, headers=headers,
            progress=advance, on_start=on_start,
        )
    return resp.status == 206


def _check_download(part: Path, v: dict[str, Any], manifest_bytes: bytes) -> tuple[str, int]:
    """(sha256, size) of the downloaded file once both it and the manifest match what the hub
    announced; a mismatching partial file is removed (blocking)."""
    sha, n = _digest(part)
    if sha != v["sha256"] or n != v["size"]:
        part.unlink(missing_ok=True)
        raise DigestMismatchError(
            f"downloaded {n} bytes with sha256 {sha[:12]}…, the hub announced "
            f"{v['sha256'][:12]}…; the partial file was removed, run pull again"
        )
    if hashlib.sha256(manifest_bytes).hexdigest() != v["manifest_sha256"]:
        raise DigestMismatchError("the manifest's sha256 is not the one the hub announced")
    return sha, n


def _check_signature(pub: Ed25519PublicKey | None, v: dict[str, Any], manifest_bytes: bytes,
                     sha: str) -> bool:
    """Whether the version's signature was verified with ``pub`` (None: not asked to)."""
    if pub is None:
        return False
    if not v["signature"]:
        raise SignatureRejected("the version is not signed")
    manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()
    if not signing.verify([pub], v["signature"], manifest_sha, sha):
        raise SignatureRejected("the signature does not verify with the given key")
    return True

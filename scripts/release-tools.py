#!/usr/bin/env python3
"""Helpers of scripts/release and scripts/verify-release (standard library
only): an SPDX 2.3 SBOM from `cargo metadata`, an OCI image layout archive
built from files (no docker CLI, no engine), and a structural check of such
an archive.

  release-tools.py sbom VERSION OUT.json < cargo-metadata.json
  release-tools.py oci VERSION OUT.tar FILE=/path/in/image[:MODE] ...
  release-tools.py check-oci ARCHIVE.tar
"""

import gzip
import hashlib
import io
import json
import os
import sys
import tarfile
import time
import uuid

EPOCH = int(os.environ.get("SOURCE_DATE_EPOCH", "0") or 0)


def sbom(version, out):
    meta = json.load(sys.stdin)
    ours = {p["id"] for p in meta["packages"] if p.get("source") is None}
    resolved = {n["id"] for n in meta.get("resolve", {}).get("nodes", [])}
    pkgs = []
    rels = []
    root = "SPDXRef-stacyvm"
    pkgs.append({
        "SPDXID": root,
        "name": "stacyvm",
        "versionInfo": version,
        "downloadLocation": "NOASSERTION",
        "licenseConcluded": "Apache-2.0",
        "licenseDeclared": "Apache-2.0",
        "copyrightText": "NOASSERTION",
        "supplier": "Organization: StacyVM",
    })
    for i, p in enumerate(sorted(meta["packages"], key=lambda p: (p["name"], p["version"]))):
        if p["id"] in ours or (resolved and p["id"] not in resolved):
            continue
        sid = f"SPDXRef-crate-{i}"
        lic = p.get("license") or "NOASSERTION"
        pkgs.append({
            "SPDXID": sid,
            "name": p["name"],
            "versionInfo": p["version"],
            "downloadLocation": f"https://crates.io/api/v1/crates/{p['name']}/{p['version']}/download"
            if (p.get("source") or "").startswith("registry+") else "NOASSERTION",
            "licenseConcluded": "NOASSERTION",
            "licenseDeclared": lic.replace("/", " OR "),
            "copyrightText": "NOASSERTION",
            "externalRefs": [{
                "referenceCategory": "PACKAGE-MANAGER",
                "referenceType": "purl",
                "referenceLocator": f"pkg:cargo/{p['name']}@{p['version']}",
            }],
        })
        rels.append({"spdxElementId": root, "relationshipType": "DEPENDS_ON", "relatedSpdxElement": sid})
    doc = {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"stacyvm-{version}",
        "documentNamespace": f"https://stacyvm.dev/spdx/stacyvm-{version}-{uuid.uuid5(uuid.NAMESPACE_URL, version)}",
        "creationInfo": {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(EPOCH or time.time())),
            "creators": ["Tool: stacyvm scripts/release"],
        },
        "packages": pkgs,
        "relationships": [{"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES", "relatedSpdxElement": root}] + rels,
    }
    with open(out, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"sbom: {len(pkgs) - 1} crates", file=sys.stderr)


def sha(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


def oci(version, out, specs):
    # One layer: the files, with their directories, root-owned, fixed times.
    lb = io.BytesIO()
    with tarfile.open(fileobj=lb, mode="w", format=tarfile.PAX_FORMAT) as t:
        dirs = set()
        entries = []
        for spec in specs:
            src, _, rest = spec.partition("=")
            dest, _, mode = rest.partition(":")
            entries.append((dest.lstrip("/"), src, int(mode, 8) if mode else None))
            parts = dest.strip("/").split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add("/".join(parts[:i]))
        for d in sorted(dirs | {"tmp", "var/lib/stacyvm"}):
            ti = tarfile.TarInfo(d)
            ti.type = tarfile.DIRTYPE
            ti.mode = 0o1777 if d == "tmp" else 0o755
            ti.mtime = EPOCH
            t.addfile(ti)
        for dest, src, mode in sorted(entries):
            data = open(src, "rb").read()
            ti = tarfile.TarInfo(dest)
            ti.size = len(data)
            ti.mode = mode if mode is not None else (os.stat(src).st_mode & 0o777)
            ti.mtime = EPOCH
            t.addfile(ti, io.BytesIO(data))
    layer = lb.getvalue()
    diff_id = sha(layer)
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", mtime=EPOCH, compresslevel=6) as g:
        g.write(layer)
    layer_gz = gz.getvalue()
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(EPOCH))
    config = json.dumps({
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "config": {
            "Entrypoint": ["/usr/local/bin/stacyvm"],
            "Cmd": ["serve"],
            "Env": [
                "PATH=/usr/local/bin:/usr/bin:/bin",
                "STACYVM_SERVER_DATA_DIR=/var/lib/stacyvm",
                "STACYVM_AGENT_PATH=/usr/local/bin/stacyvm-agent",
            ],
            "ExposedPorts": {"7423/tcp": {}},
            "Volumes": {"/var/lib/stacyvm": {}},
            "WorkingDir": "/",
            "Labels": {
                "org.opencontainers.image.title": "stacyvm",
                "org.opencontainers.image.version": version,
                "org.opencontainers.image.licenses": "Apache-2.0",
            },
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": "stacyvm scripts/release"}],
    }, sort_keys=True).encode()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha(layer_gz), "size": len(layer_gz)}],
    }, sort_keys=True).encode()
    ref = f"stacyvm:{version}"
    index = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha(manifest),
            "size": len(manifest),
            "annotations": {"org.opencontainers.image.ref.name": version, "io.containerd.image.name": f"docker.io/library/{ref}"},
        }],
    }, sort_keys=True).encode()
    blob = lambda d: "blobs/sha256/" + d.split(":", 1)[1]
    # Docker engines before OCI archive support load the same file through
    # its docker-archive manifest.
    docker_manifest = json.dumps([{
        "Config": blob(sha(config)),
        "RepoTags": [ref],
        "Layers": [blob(sha(layer_gz))],
    }]).encode()
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as t:
        def add(name, data, mode=0o644):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mode = mode
            ti.mtime = EPOCH
            t.addfile(ti, io.BytesIO(data))
        for d in ["blobs", "blobs/sha256"]:
            ti = tarfile.TarInfo(d)
            ti.type = tarfile.DIRTYPE
            ti.mode = 0o755
            ti.mtime = EPOCH
            t.addfile(ti)
        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add("index.json", index)
        add("manifest.json", docker_manifest)
        add(blob(sha(config)), config)
        add(blob(sha(manifest)), manifest)
        add(blob(sha(layer_gz)), layer_gz)
    print(f"oci: {ref} {sha(manifest)} ({len(layer_gz)} bytes of layer)", file=sys.stderr)


def check_oci(path):
    """Every digest and size the archive names matches its blob."""
    with tarfile.open(path) as t:
        names = set(t.getnames())

        def read(name):
            if name not in names:
                raise SystemExit(f"{path}: {name} is missing")
            return t.extractfile(name).read()

        def blob(desc):
            d = desc["digest"]
            data = read("blobs/sha256/" + d.split(":", 1)[1])
            if sha(data) != d or len(data) != desc["size"]:
                raise SystemExit(f"{path}: blob {d} does not match its digest or size")
            return data

        if json.loads(read("oci-layout")).get("imageLayoutVersion") != "1.0.0":
            raise SystemExit(f"{path}: not an OCI image layout")
        index = json.loads(read("index.json"))
        for m in index["manifests"]:
            man = json.loads(blob(m))
            cfg = json.loads(blob(man["config"]))
            diffs = cfg["rootfs"]["diff_ids"]
            for layer, diff in zip(man["layers"], diffs):
                data = blob(layer)
                if layer["mediaType"].endswith("+gzip"):
                    data = gzip.decompress(data)
                if sha(data) != diff:
                    raise SystemExit(f"{path}: layer {layer['digest']} does not unpack to {diff}")
    print(f"oci: {path} is consistent")


def main():
    if len(sys.argv) >= 4 and sys.argv[1] == "sbom":
        sbom(sys.argv[2], sys.argv[3])
    elif len(sys.argv) >= 5 and sys.argv[1] == "oci":
        oci(sys.argv[2], sys.argv[3], sys.argv[4:])
    elif len(sys.argv) == 3 and sys.argv[1] == "check-oci":
        check_oci(sys.argv[2])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

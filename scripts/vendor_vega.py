"""Write vendor/dvc_plots.html: DVC's plots page with Vega, Vega-Lite and Vega-Embed inlined, so it renders offline.

DVC's default page loads these three scripts from a CDN, so `dvc plots show` gives a blank page without network.
`.dvc/config` points `plots.html_template` at the file this script writes. The versions are the ones dvc-render's
default page asks for; the tarballs come from the npm registry (`npm pack`) and are checked against the integrity
npm publishes, and each inlined file against its own sha256, both pinned below.

    python scripts/vendor_vega.py                  # npm pack into a temporary folder, then write the template
    python scripts/vendor_vega.py --tarballs DIR   # use vega-5.20.2.tgz etc. already in DIR (no network)

To move to other versions: change PACKAGES, run it once with the new hashes it reports as wrong, check them against
`npm view NAME@VERSION dist.integrity`, pin them, and commit the regenerated template.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "vendor" / "dvc_plots.html"


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    integrity: str  # npm's sha512 of the tarball, as `npm view NAME@VERSION dist.integrity` prints it
    script: str  # the browser bundle inside the tarball (the package's "jsdelivr" entry, what the CDN serves)
    script_sha256: str
    license_sha256: str

    @property
    def tarball(self) -> str:
        return f"{self.name}-{self.version}.tgz"


# Loaded in this order: vega-lite and vega-embed expect the globals of the ones before them.
PACKAGES = (
    Package(
        "vega",
        "5.20.2",
        "sha512-qmH7aD9GGPpssVdxL1xgcdxTbQzyRUeRR16Os385ymvQhiwCYQNA6+eXUPAZDTVLfk0RXu6Jzj6kUE5jQ80EVw==",
        "package/build/vega.min.js",
        "4794d0169cb1f3ebad8117fe98ba5bd652dd725905ec0384e832391dbccb03be",
        "0af895a1dac4df349658e87c9605638d5b79f86bc8533dfb8e43a05c18dca92d",
    ),
    Package(
        "vega-lite",
        "5.2.0",
        "sha512-Yxcg8MvYfxHcG6BbkaKT0oVCIMIcE19UvqIsEwBmyd/7h2nzW7oRnID81T8UrY7hpDrIr6wa2JADOT2dhGNErw==",
        "package/build/vega-lite.min.js",
        "d73157451b3978015ab31dacd55ff90d986ab8663fc0abed50f97b3cd90002cb",
        "f618900fd0d64046963b29f40590cdd1e341a2f41449f99110d82fd81fea808c",
    ),
    Package(
        "vega-embed",
        "6.18.2",
        "sha512-wcDyQPE4J5aiCDc3/suH5RQDvrKkjuLkhzUcbOLwEkNF8/+pp17tS0JghzEvAPNRg+5aG1/N2ydixq8Lk3dOlg==",
        "package/build/vega-embed.min.js",
        "1ba9826431ddc9805e815ad92acc811c819f2bfd32bda2a128b8c4b5070fab5e",
        "32df67148f0fc3db0eb9e263a7b75d07f1eb14c61955005a4a39c6918d10d137",
    ),
)

# dvc-render's page with its `{scripts}` placeholder (the CDN tags) left out: the inlined scripts replace it.
# `{refresh_tag}` and `{plot_divs}` are filled by DVC.
PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- Written by scripts/vendor_vega.py; do not edit by hand. -->
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def _check(label: str, data: bytes, expected: str, digest: str = "sha256") -> None:
    if digest == "sha512":
        actual = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
    else:
        actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        sys.exit(f"error: {label}: {digest} is {actual}, pinned {expected}; refusing to vendor it")


def _member(tar: tarfile.TarFile, name: str) -> bytes:
    f = tar.extractfile(name)
    if f is None:
        sys.exit(f"error: {name} is not a file in the tarball")
    return f.read()


def script_tag(pkg: Package, code: str, license_text: str) -> str:
    # Inlined code must not close its own <script> element, and the page's placeholders must occur only once.
    for bad in ("</script", "{plot_divs}", "{scripts}", "{refresh_tag}"):
        if bad in code or bad in license_text:
            sys.exit(f"error: {pkg.script} contains {bad!r}; it can't be inlined as it is")
    return (
        f"    <!-- {pkg.name} {pkg.version}, from the npm registry. Its licence:\n{license_text.strip()}\n    -->\n"
        f'    <script data-package="{pkg.name}@{pkg.version}" data-sha256="{pkg.script_sha256}">{code}</script>'
    )


def render(tarballs: Path) -> str:
    tags = []
    for pkg in PACKAGES:
        data = (tarballs / pkg.tarball).read_bytes()
        _check(pkg.tarball, data, pkg.integrity, "sha512")
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            code, license_text = _member(tar, pkg.script), _member(tar, "package/LICENSE")
        _check(f"{pkg.tarball}:{pkg.script}", code, pkg.script_sha256)
        _check(f"{pkg.tarball}:package/LICENSE", license_text, pkg.license_sha256)
        tags.append(script_tag(pkg, code.decode("utf-8"), license_text.decode("utf-8")))
    return PAGE.format(scripts="\n".join(tags))


def npm_pack(into: Path) -> None:
    specs = [f"{p.name}@{p.version}" for p in PACKAGES]
    subprocess.run(["npm", "pack", "--silent", *specs], cwd=into, check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tarballs", type=Path, help="folder holding the .tgz files (default: npm pack them)")
    parser.add_argument("--out", type=Path, default=TEMPLATE, help=f"default: {TEMPLATE.relative_to(ROOT)}")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.tarballs
        if folder is None:
            folder = Path(tmp)
            npm_pack(folder)
        page = render(folder)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page, encoding="utf-8")
    print(f"wrote {args.out} ({len(page.encode()) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()

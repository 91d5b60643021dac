"""The committed plots page carries Vega, Vega-Lite and Vega-Embed inline, byte for byte the pinned releases."""

from __future__ import annotations

import configparser
import hashlib
import importlib.util
import re
import sys

import pytest

from .conftest import ROOT


def _vendor_script():
    spec = importlib.util.spec_from_file_location("vendor_vega", ROOT / "scripts" / "vendor_vega.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


vendor = _vendor_script()
SCRIPT = re.compile(r'<script data-package="([^"]+)" data-sha256="([0-9a-f]{64})">(.*?)</script>', re.DOTALL)


def test_template_inlines_exactly_the_pinned_scripts():
    page = vendor.TEMPLATE.read_text(encoding="utf-8")
    found = SCRIPT.findall(page)
    assert [spec for spec, _, _ in found] == [f"{p.name}@{p.version}" for p in vendor.PACKAGES]
    for (_, recorded, code), pkg in zip(found, vendor.PACKAGES, strict=True):
        assert recorded == pkg.script_sha256
        assert hashlib.sha256(code.encode("utf-8")).hexdigest() == pkg.script_sha256, f"{pkg.name} was altered"
    assert page.count("<script") == len(vendor.PACKAGES)  # nothing else is loaded, from a CDN or anywhere
    assert "{plot_divs}" in page and "{scripts}" not in page
    assert len(page.encode()) < 2_000_000


def test_dvc_uses_the_template_without_flags():
    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc" / "config")
    # DVC resolves a relative html_template against the .dvc folder.
    assert (ROOT / ".dvc" / config["plots"]["html_template"]).resolve() == vendor.TEMPLATE.resolve()


def test_a_tampered_script_is_refused():
    pkg = vendor.PACKAGES[0]
    with pytest.raises(SystemExit, match="refusing to vendor"):
        vendor._check(pkg.script, b"alert(1)", pkg.script_sha256)

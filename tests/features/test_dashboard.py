"""The static dashboard: pages from a feature store, escaping, errors, and a real browser.

The browser tests run Debian's ``chromium`` headless on the files from disk (``file://``);
they skip, saying so, where no chromium is installed (``.ci/run`` installs it with apt).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_interp.cli import run_extra_command
from lightning_interp.errors import (
    ConfigError,
    FeatureStoreNotFoundError,
    InvalidFeatureStoreError,
    OutputExistsError,
)
from lightning_interp.features.dashboard import build_dashboard
from tests.features.store_fixture import HOSTILE, planted, write_store

N_LATENTS = 6
CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no `chromium` on PATH: install Debian's (apt-get install -y chromium; .ci/run "
    "does) to run the browser tests",
)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return write_store(tmp_path / "store", n_latents=N_LATENTS)


@pytest.fixture
def site(store: Path, tmp_path: Path) -> Path:
    """A rendered dashboard folder."""
    return build_dashboard(store, tmp_path / "html").parent


def index_rows(site: Path) -> list[list]:
    html = (site / "index.html").read_text(encoding="utf-8")
    block = re.search(
        r'<script id="latent-data" type="application/json">(.*?)</script>', html, re.S
    )
    return json.loads(block.group(1))["rows"]


# ---------------------------------------------------------------------------- pages
def test_every_latent_gets_a_page_and_an_index_row(site: Path):
    assert sorted(p.name for p in (site / "latents").iterdir()) == sorted(
        f"{i}.html" for i in range(N_LATENTS)
    )
    rows = index_rows(site)
    assert [row[0] for row in rows] == list(range(N_LATENTS))
    # The index's search tokens are each latent's top-activating (planted) tokens.
    assert all(planted(i) in rows[i][6] for i in range(N_LATENTS - 1))
    assert rows[-1][1] == 0 and rows[-1][6] == []  # the dead latent
    assert {"dashboard.css", "index.js"} <= {p.name for p in (site / "assets").iterdir()}
    assert json.loads((site / "dashboard.json").read_text())["latents"] == N_LATENTS


def test_a_latent_page_holds_its_contexts_histogram_logits_and_links(site: Path, store: Path):
    page = (site / "latents" / "1.html").read_text(encoding="utf-8")
    stats = load_file(str(store / "stats.safetensors"))
    assert page.count(planted(1)) >= 4  # every top context is centred on the planted token
    bars = re.findall(r"<rect [^>]*><title>(\d+) between", page)
    assert sum(map(int, bars)) == int(stats["count"][1])  # one bar per non-empty bin
    assert "Logit lens" in page and 'href="2.html"' in page and 'href="3.html"' in page
    # Shading is activation / latent max: the top context's centre is the latent's max.
    assert 'class="c" style="--a:1.00"' in page
    assert "no examples" not in page


def test_shading_is_proportional_to_the_activation(site: Path, store: Path):
    contexts = load_file(str(store / "contexts.safetensors"))
    stats = load_file(str(store / "stats.safetensors"))
    page = (site / "latents" / "2.html").read_text(encoding="utf-8")
    shades = {round(float(a), 2) for a in re.findall(r'--a:([0-9.]+)" title', page)}
    acts = torch.cat(
        [contexts["top_activations"][2].flatten(), contexts["quantile_activations"][2].flatten()]
    )
    expected = {round(float(a) / float(stats["max_activation"][2]), 2) for a in acts if a > 0}
    assert shades - {0.0} == expected


def test_tokens_from_the_corpus_are_escaped_in_the_html(site: Path):
    for page in (site / "latents" / "0.html", site / "index.html"):
        html = page.read_text(encoding="utf-8")
        assert "<img" not in html and "<script>alert" not in html
    page = (site / "latents" / "0.html").read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # context and logit table
    assert "&#34;&gt;&lt;img src=x onerror=alert(2)&gt;" in page  # explanation and context
    assert HOSTILE[1] in index_rows(site)[0][7]  # the index keeps the raw text as JSON data


def test_dead_latent_and_store_without_logit_lens(tmp_path: Path):
    store = write_store(tmp_path / "s", n_latents=3, logit_lens=0, explanations=False)
    site = build_dashboard(store, tmp_path / "html").parent
    dead = (site / "latents" / "2.html").read_text(encoding="utf-8")
    assert "never fired" in dead and "Logit lens" not in dead
    assert "score" not in (site / "index.html").read_text(encoding="utf-8")


def test_image_stores_show_patch_grids(tmp_path: Path):
    store = write_store(tmp_path / "s", n_latents=3, window=16)
    meta = json.loads((store / "store.json").read_text())
    (store / "store.json").write_text(json.dumps(meta | {"modality": "image"}))
    contexts = load_file(str(store / "contexts.safetensors"))
    contexts["top_image"] = torch.arange(3 * 4).reshape(3, 4)
    save_file(contexts, str(store / "contexts.safetensors"))
    page = (build_dashboard(store, tmp_path / "html").parent / "latents" / "0.html").read_text()
    assert 'class="grid" style="--side:4"' in page and "image 3 ·" in page


def test_latents_option_renders_a_prefix_and_links_only_rendered_pages(store: Path, tmp_path: Path):
    site = build_dashboard(store, tmp_path / "html", latents=2).parent
    assert sorted(p.name for p in (site / "latents").iterdir()) == ["0.html", "1.html"]
    assert len(index_rows(site)) == 2
    page = (site / "latents" / "1.html").read_text(encoding="utf-8")
    assert 'href="2.html"' not in page and "latent 2" in page  # correlated, not rendered
    with pytest.raises(ConfigError, match="--latents"):
        build_dashboard(store, tmp_path / "other", latents=0)


# ---------------------------------------------------------------------------- output folder
def test_rebuilding_replaces_a_dashboard_and_refuses_other_folders(store: Path, tmp_path: Path):
    out = tmp_path / "html"
    build_dashboard(store, out, latents=2)
    build_dashboard(store, out)
    assert len(list((out / "latents").iterdir())) == N_LATENTS
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not a dashboard"):
        build_dashboard(store, foreign)
    assert [p.name for p in foreign.iterdir()] == ["todo.txt"]


def test_a_failed_build_leaves_nothing_behind(store: Path, tmp_path: Path):
    vocab = json.loads((store / "vocab.json").read_text())
    (store / "vocab.json").write_text(json.dumps(vocab | {"x": "not an id"}))
    with pytest.raises(InvalidFeatureStoreError, match="vocab.json"):
        build_dashboard(store, tmp_path / "html")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


# ---------------------------------------------------------------------------- errors
def _drop(key: str):
    def edit(store: Path) -> None:
        stats = load_file(str(store / "stats.safetensors"))
        del stats[key]
        save_file(stats, str(store / "stats.safetensors"))

    return edit


def _meta(**changes):
    def edit(store: Path) -> None:
        meta = json.loads((store / "store.json").read_text())
        (store / "store.json").write_text(json.dumps(meta | changes))

    return edit


@pytest.mark.parametrize(
    ("edit", "error", "says"),
    [
        (lambda s: shutil.rmtree(s), FeatureStoreNotFoundError, "does not exist"),
        (
            lambda s: (s / "contexts.safetensors").unlink(),
            FeatureStoreNotFoundError,
            "missing contexts",
        ),
        (lambda s: (s / "store.json").write_text("{"), InvalidFeatureStoreError, "store.json"),
        (_meta(format="other"), InvalidFeatureStoreError, "not a feature store"),
        (_meta(version=2), InvalidFeatureStoreError, "version 2"),
        (_meta(window=5), InvalidFeatureStoreError, "top_tokens"),
        (_drop("histogram"), InvalidFeatureStoreError, "lacks histogram"),
        (
            lambda s: (s / "stats.safetensors").write_bytes(b"xx"),
            InvalidFeatureStoreError,
            "not readable",
        ),
    ],
)
def test_a_bad_store_is_one_typed_line_and_exit_2(store, tmp_path, capsys, edit, error, says):
    edit(store)
    with pytest.raises(error, match=says):
        build_dashboard(store, tmp_path / "html")
    assert run_extra_command("dashboard", [str(store), "--out", str(tmp_path / "html")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and err[0].startswith("lightning-interp dashboard: error:") and says in err[0]
    )
    assert not (tmp_path / "html").exists()


def test_the_command_prints_the_index_path(store: Path, tmp_path: Path, capsys):
    assert run_extra_command("dashboard", [str(store), "--out", str(tmp_path / "html")]) == 0
    assert capsys.readouterr().out.strip() == str((tmp_path / "html" / "index.html").resolve())


# ---------------------------------------------------------------------------- browser
def chromium(tmp_path: Path, *args: str) -> str:
    """Run headless chromium (its own profile folder, so parallel runs do not collide)."""
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--window-size=1280,900",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout


def png_pixels(path: Path) -> list[bytes]:
    """The rows of an 8-bit RGB/RGBA PNG as raw pixel bytes (PNG filters undone)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0
    bpp = 3 if colour == 2 else 4
    raw, stride, rows, previous = zlib.decompress(idat), width * bpp, [], bytes(width * bpp)
    for y in range(height):
        kind, line = (
            raw[y * (stride + 1)],
            bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)]),
        )
        for i in range(stride):
            left = line[i - bpp] if i >= bpp else 0
            up, corner = previous[i], previous[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + left) & 255
            elif kind == 2:
                line[i] = (line[i] + up) & 255
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[i] = (
                    line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)
                ) & 255
        rows.append(bytes(line))
        previous = line
    return rows


def assert_not_blank(path: Path) -> None:
    rows = png_pixels(path)
    assert len(rows) == 900
    background = rows[-1][:3]
    pixels = {row[i : i + 3] for row in rows[::10] for i in range(0, len(row), 3 * 7)}
    assert len(pixels) > 20, "the screenshot is (nearly) one colour: the page did not render"
    inked = sum(
        row[i : i + 3] != background for row in rows[::10] for i in range(0, len(row), 3 * 7)
    )
    assert inked > 0.02 * len(rows[::10]) * len(range(0, len(rows[0]), 3 * 7))


@needs_chromium
def test_the_index_lists_latents_in_a_browser_and_search_data_is_text(site: Path, tmp_path: Path):
    dom = chromium(tmp_path, "--dump-dom", (site / "index.html").as_uri())
    assert len(re.findall(r'<tr class="latent( dead)?">', dom)) == N_LATENTS
    assert all(f'href="latents/{i}.html"' in dom for i in range(N_LATENTS))
    assert f'<span class="chip">{planted(3)}</span>' in dom
    assert "<img" not in dom and "&lt;img src=x onerror=alert(2)&gt;" in dom  # shown as text


@needs_chromium
def test_a_latent_page_in_a_browser_shows_contexts_histogram_and_escaped_tokens(site, tmp_path):
    dom = chromium(tmp_path, "--dump-dom", (site / "latents" / "0.html").as_uri())
    assert dom.count(planted(0)) >= 4
    assert re.search(r'<svg class="hist"[^>]*>.*?<rect ', dom, re.S)
    # The hostile tokens are text nodes: no element was injected, no script but none at all.
    assert "<img" not in dom and "<script" not in dom
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    assert '"&gt;&lt;img src=x onerror=alert(2)&gt;' in dom


@needs_chromium
def test_screenshots_are_not_blank(site: Path, tmp_path: Path):
    for name, page in (("index", site / "index.html"), ("latent", site / "latents" / "1.html")):
        shot = tmp_path / f"{name}.png"
        chromium(tmp_path, f"--screenshot={shot}", page.as_uri())
        assert_not_blank(shot)


def test_a_store_built_by_the_feature_pass_renders(tmp_path: Path):
    from lightning_interp.features.build import build_feature_store
    from lightning_interp.features.store import FeatureSettings
    from tests.features.builder_helpers import SITE, tiny_setup

    backbone, sae, corpus = tiny_setup(d_latent=16)
    settings = FeatureSettings(top_k=3, window=6, quantile_bins=2, per_quantile=2, correlated=3)
    store = build_feature_store(
        sae, backbone, corpus, tmp_path / "store", site=SITE, settings=settings, progress=False
    )
    site = build_dashboard(store, tmp_path / "html").parent
    rows = index_rows(site)
    stats = load_file(str(store / "stats.safetensors"))
    assert [row[1] for row in rows] == stats["count"].tolist()
    contexts = load_file(str(store / "contexts.safetensors"))
    vocab = json.loads((store / "vocab.json").read_text())
    busiest = int(stats["count"].argmax())
    centre = int(contexts["top_center"][busiest, 0])
    token = vocab[str(int(contexts["top_tokens"][busiest, 0, centre]))]
    page = (site / "latents" / f"{busiest}.html").read_text(encoding="utf-8")
    assert "Logit lens" in page and "never fired" not in page
    assert '<i class="c" style="--a:1.00"' in page  # the top example's centre is the max
    assert token.strip() in rows[busiest][6][0]


@needs_chromium
def test_the_index_searches_by_token_and_sorts_in_a_browser(site: Path, store: Path, tmp_path):
    url = (site / "index.html").as_uri()
    found = chromium(tmp_path, "--dump-dom", url + "?q=planted_3")
    assert re.findall(r'href="latents/(\d+)\.html"', found) == ["3"]
    ordered = chromium(tmp_path, "--dump-dom", url + "?sort=max")
    maxima = load_file(str(store / "stats.safetensors"))["max_activation"]
    expected = [str(i) for i in torch.argsort(maxima, descending=True, stable=True).tolist()]
    assert re.findall(r'href="latents/(\d+)\.html"', ordered) == expected

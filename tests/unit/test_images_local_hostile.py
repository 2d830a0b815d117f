"""Issue #17 item 11: `--allowed-local-media-path` under attack. A directory swapped for a
symlink between the check and the open read a file outside (24 of 600 tries), and refusals
told which files exist outside the directory."""

from __future__ import annotations

import io
import os
import threading
import time

import pytest
from PIL import Image

from mistralpy.processing.errors import ImageError
from mistralpy.processing.images import ImagePolicy, load_image

INSIDE, OUTSIDE = (10, 200, 10), (200, 10, 10)


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def tree(tmp_path):
    """root/ (allowed) with real/a.png; outside/a.png a different colour."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "real").mkdir(parents=True)
    outside.mkdir()
    (root / "real" / "a.png").write_bytes(_png(INSIDE))
    (outside / "a.png").write_bytes(_png(OUTSIDE))
    return root, outside


def test_directory_swapped_for_a_symlink_never_leads_outside(tree):
    root, outside = tree
    policy = ImagePolicy(allowed_local_media_path=root)
    swap = root / "swap"
    stop = threading.Event()

    def swapper():  # swap/ flips between the real directory and a symlink to outside/
        real = root / "real"
        while not stop.is_set():
            real.rename(swap)
            time.sleep(0.0002)
            swap.rename(real)
            os.symlink(outside, swap)
            time.sleep(0.0002)
            os.unlink(swap)

    thread = threading.Thread(target=swapper, daemon=True)
    thread.start()
    leaked = read = 0
    try:
        for _ in range(600):
            try:
                image = load_image("swap/a.png", policy)
            except ImageError:
                continue
            read += 1
            leaked += image.convert("RGB").getpixel((0, 0)) == OUTSIDE
    finally:
        stop.set()
        thread.join(5)
    assert leaked == 0, f"read the outside file {leaked} times"
    assert read > 0  # the real directory was sometimes there and was read


def test_every_refusal_reads_the_same(tree):
    root, outside = tree
    os.symlink(outside / "a.png", root / "link.png")
    policy = ImagePolicy(allowed_local_media_path=root)
    messages = set()
    for source in (
        "/etc/shadow",
        "/etc/shadowX",
        "/etc/passwd",
        str(outside / "a.png"),
        str(outside / "missing.png"),
        "../outside/a.png",
        "link.png",
        "missing.png",
        "./real",
        f"file://{outside}/a.png",
    ):
        with pytest.raises(ImageError) as info:
            load_image(source, policy)
        messages.add((type(info.value).__name__, str(info.value)))
    assert len(messages) == 1, messages

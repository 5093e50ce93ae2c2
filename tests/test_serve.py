"""n2n serve in a real browser: Debian's Chromium, driven by Selenium, over two small runs made here (text ->
image and image -> text, on 127.0.0.1 only). A person's path: type a caption, click, look at the gallery (the
run's own samples for that seed), upload an image and read the captions back, get a message for a bad input,
close a tab mid-request; then 20 requests in a row without the server's memory growing past the first's."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import n2n
from n2n.extract.train_ae import ConvAutoencoder, save_autoencoder
from n2n.translate.serve import Served, to_uint8

pytest.importorskip("gradio")
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
CAPTION = "a small red circle in the top left"
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER) and not os.environ.get("CI"),
                                reason="Chromium and chromedriver are not installed (apt-get install chromium "
                                       "chromium-driver; .ci/run installs them)")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Text -> image and image -> text over 48 shapes items at 32 px: MiniLM and a 1-block autoencoder."""
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    expert = save_autoencoder(ConvAutoencoder(image_size=32, channels=(4,), latent_dim=8), root / "experts" / "ae")
    common = {"out": root / "shards", "limit": 48, "num_workers": 0, "batch_size": 16, "data_options": {"size": 32},
              "progress": False}
    text, image = n2n.extract("minilm", "shapes", **common), n2n.extract(f"ae:{expert}", "shapes", **common)
    tiny = {"steps": 20, "n_flows": 2, "hidden_dim": 16, "batch_size": 32, "compile": False, "progress": False,
            "logger": "none"}
    return {"text": n2n.train(n2n.pair(text, image, name="text_image"), root / "runs" / "text_image", **tiny),
            "image": n2n.train(n2n.pair(image, text, name="image_text"), root / "runs" / "image_text", **tiny)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    """n2n serve over both runs on a free loopback port, as the command starts it (the runs from a --config
    file, as a user keeps them); stopped at the end."""
    port = free_port()
    config = tmp_path_factory.mktemp("serve-config") / "serve.yaml"
    config.write_text(f"run:\n- {runs['text']}\n- {runs['image']}\nhost: 127.0.0.1\n")
    process = subprocess.Popen([sys.executable, "-c", "from n2n.cli import main; main()", "serve",
                                "--config", str(config), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"n2n serve exited: {process.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("n2n serve did not answer within 180 s")
    yield {"url": url, "process": process}
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1400"):
        options.add_argument(argument)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=webdriver.ChromeService(DRIVER), options=options)
    yield driver
    driver.quit()


def wait(driver, condition, seconds: float = 120):
    return WebDriverWait(driver, seconds).until(condition)


def fetch(url: str) -> np.ndarray:
    with urllib.request.urlopen(url, timeout=30) as response:
        return np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))


def translate(driver, caption: str) -> list:
    box = wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#caption-0 textarea"))
    box.clear()
    box.send_keys(caption)
    driver.find_element(By.CSS_SELECTOR, "#go-0").click()


def test_a_caption_gives_the_runs_own_samples_and_a_bad_one_a_message(server, runs, browser, tmp_path):
    browser.get(server["url"])
    translate(browser, "   ")
    wait(browser, lambda d: "type a caption first" in d.page_source, 60)  # a message, not a stack trace
    browser.save_screenshot(str(tmp_path / "empty-caption.png"))
    translate(browser, CAPTION)
    images = wait(browser, lambda d: (found := d.find_elements(By.CSS_SELECTOR, "#gallery-0 img")) and
                  len(found) == 8 and found)
    browser.save_screenshot(str(tmp_path / "text-to-image.png"))
    shown = [fetch(image.get_attribute("src")) for image in images]
    expected = n2n.Translator.load(runs["text"]).translate([CAPTION], n=8, seed=0)[0]
    assert all(np.array_equal(a, to_uint8(b)) for a, b in zip(shown, expected, strict=True))


def test_an_uploaded_image_gives_the_nearest_captions(server, runs, browser, tmp_path):
    picture = tmp_path / "red.png"
    image = Image.new("RGB", (32, 32), (10, 10, 10))
    ImageDraw.Draw(image).ellipse([4, 4, 16, 16], fill=(220, 40, 40))
    image.save(picture)
    browser.get(server["url"])
    wait(browser, lambda d: d.find_elements(By.XPATH, "//button[@role='tab' and contains(., 'image_text')]"))[0].click()
    upload = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#image-1 input[type=file]"))
    upload.send_keys(str(picture))
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#image-1 img"), 60)
    browser.find_element(By.CSS_SELECTOR, "#go-1").click()
    table = wait(browser, lambda d: (text := d.find_element(By.CSS_SELECTOR, "#captions-1").text.splitlines()) and
                 len(text) >= 5 + 4 * 3 * 4 and text)  # the label, four headers, then 4 samples x 3 captions x 4 cells
    browser.save_screenshot(str(tmp_path / "image-to-text.png"))
    cells = table[5:]
    shown = [[int(cells[i]), int(cells[i + 1]), float(cells[i + 2]), cells[i + 3]] for i in range(0, len(cells), 4)]
    expected = Served.load(str(runs["image"]), "cpu").captions([Image.open(picture).convert("RGB")], 4, 1.0, 0)
    assert shown == expected


def test_the_page_fits_a_phone(server, browser, tmp_path):
    browser.set_window_size(390, 844)
    browser.get(server["url"])
    wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#caption-0 textarea"))
    browser.save_screenshot(str(tmp_path / "phone.png"))
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 390 + 4  # no sideways scroll


def test_the_server_outlives_a_closed_tab_and_keeps_its_memory_over_20_requests(server, browser):
    from gradio_client import Client

    browser.get(server["url"])
    translate(browser, CAPTION)
    browser.close()  # the tab goes while its request runs
    client = Client(server["url"], verbose=False)

    def rss_kib() -> int:
        status = Path(f"/proc/{server['process'].pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))

    client.predict(CAPTION, 8, 1.0, 0, api_name="/translate_0")
    first = rss_kib()
    for seed in range(20):
        gallery = client.predict(f"{CAPTION} {seed}", 8, 1.0, seed, api_name="/translate_0")
        assert len(gallery) == 8
    assert server["process"].poll() is None
    assert rss_kib() <= first * 1.05 + 16_384, (first, rss_kib())  # within 5% (+16 MiB of allocator slack)


def test_inputs_a_person_can_get_wrong_are_messages(runs):
    """What the page turns into a message: an empty caption, one longer than the source expert reads, no image."""
    from n2n.translate.serve import ServeError, inputs

    text, image = Served.load(str(runs["text"]), "cpu"), Served.load(str(runs["image"]), "cpu")
    with pytest.raises(ServeError, match="type a caption first"):
        inputs("  ", "text", text)
    with pytest.raises(ServeError, match=r"tokens long; minilm.* reads at most \d+: shorten it"):
        inputs("a red circle " * 400, "text", text)
    assert inputs(f"  {CAPTION} ", "text", text) == CAPTION
    with pytest.raises(ServeError, match="upload an image first"):
        inputs(None, "image", image)


def test_serve_takes_its_options_as_every_command_does(runs, invoke):
    """--config, ranges checked before any run loads, and the sampling options a kind does not have refused
    by name when a request would use them."""
    from n2n.cli import main
    from n2n.translate.pipeline import SamplingConfig

    result = invoke(main, "serve", "--run", str(runs["text"]), "--port", 0)
    assert result.exit_code == 2 and "port" in result.output and "1" in result.output
    result = invoke(main, "serve", "--run", str(runs["text"]), "--guidance", -1)
    assert result.exit_code == 2 and "guidance" in result.output
    assert "--steps" in invoke(main, "serve", "--help").output
    served = Served.load(str(runs["text"]), "cpu", SamplingConfig(guidance=2.0))
    with pytest.raises(n2n.N2NError, match="--guidance: this run's coupling translator"):
        served.images([CAPTION], 1, 1.0, 0)
    assert len(Served.load(str(runs["text"]), "cpu", SamplingConfig(n=2)).images([CAPTION], 2, 1.0, 0)) == 2


def bomb_png(path: Path, side: int = 20_000) -> Path:
    """A PNG whose header says side x side pixels (a decompression bomb's size), with almost no data: PIL refuses
    it on opening, before decoding anything."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_an_upload_that_is_no_image_or_a_bomb_is_a_message_in_n2ns_words(server, browser, tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    cases = [(not_image, "is not an image n2n can read"), (bomb_png(tmp_path / "bomb.png"), "too large to open")]
    for path, message in cases:
        browser.get(server["url"])
        wait(browser, lambda d: d.find_elements(By.XPATH, "//button[@role='tab' and contains(., 'image_text')]"))[
            0].click()
        upload = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#image-1 input[type=file]"))
        upload.send_keys(str(path))
        time.sleep(1)
        browser.find_element(By.CSS_SELECTOR, "#go-1").click()
        wait(browser, lambda d, message=message: message in d.page_source, 60)
        assert "Could not preprocess" not in browser.page_source
    assert server["process"].poll() is None  # the server goes on


def test_the_edit_tab_shows_the_reconstruction_and_the_edit(server, runs, browser, tmp_path):
    picture = tmp_path / "circle.png"
    Image.fromarray(np.asarray(render_item())).save(picture)
    browser.get(server["url"])
    wait(browser, lambda d: d.find_element(By.XPATH, "//button[contains(., 'edit an image')]")).click()
    upload = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#edit-image-0 input[type=file]"))
    upload.send_keys(str(picture))
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#edit-image-0 img"), 60)
    browser.find_element(By.CSS_SELECTOR, "#edit-from-0 textarea").send_keys(CAPTION)
    browser.find_element(By.CSS_SELECTOR, "#edit-to-0 textarea").send_keys("a small blue circle in the top left")
    browser.find_element(By.CSS_SELECTOR, "#edit-go-0").click()
    images = wait(browser, lambda d: (found := d.find_elements(By.CSS_SELECTOR, "#edit-gallery-0 img")) and
                  len(found) >= 2 and found)
    browser.save_screenshot(str(tmp_path / "edit.png"))
    shown = [fetch(image.get_attribute("src")) for image in images[:2]]
    expected = Served.load(str(runs["text"]), "cpu").edit(Image.open(picture).convert("RGB"), CAPTION,
                                                          "a small blue circle in the top left")
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(shown, expected, strict=True))


def render_item() -> Image.Image:
    from n2n.extract.datasets.shapes_world import render

    return render({"color": "red", "shape": "circle", "size": "small", "position": "top-left"}, 32)

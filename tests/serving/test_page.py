"""The web page in a real headless browser (Debian's chromium driven by Selenium), on the
server that needs a token: without it the page says so; with the token typed into its
field, pick a file, see five bars. Skipped where chromium/chromedriver are not installed;
CI installs them."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

from tests.serving.helpers import TOKEN

webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="chromium and chromedriver not installed")


def test_upload_with_the_token_shows_five_bars(guarded, tmp_path):
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "photo.jpg"
    Image.new("RGB", (320, 240), (30, 160, 60)).save(image, "JPEG")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        driver.set_window_size(900, 1000)
        driver.get(f"{guarded[0]}/")
        assert "AlexNet" in driver.title
        driver.find_element(By.ID, "file").send_keys(str(image))  # no token yet
        WebDriverWait(driver, 60).until(lambda d: "needs a token" in d.find_element(By.ID, "error").text)
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.get(f"{guarded[0]}/")  # reloaded: the token field keeps its value for this tab
        assert driver.find_element(By.ID, "token").get_attribute("value") == TOKEN
        driver.find_element(By.ID, "file").send_keys(str(image))
        WebDriverWait(driver, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".prediction")) == 5)
        rows = driver.find_elements(By.CSS_SELECTOR, ".prediction")
        widths = [r.find_element(By.CSS_SELECTOR, ".bar").size["width"] for r in rows]
        assert all(w > 0 for w in widths) and widths == sorted(widths, reverse=True)
        assert all(r.find_element(By.CSS_SELECTOR, ".label").text for r in rows)
        assert driver.find_element(By.ID, "error").text == ""
        driver.save_screenshot(str(tmp_path / "page.png"))
    finally:
        driver.quit()

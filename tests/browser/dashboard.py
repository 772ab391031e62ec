"""The dashboard in headless Chromium, driven by Selenium (chromedriver).

Run by tests/e2e_dashboard.rs with: GATEWAY (http://host:port), ADMIN_KEY,
SPEC (a spec file to deploy), REVOKE (a key name to revoke), SHOTS (where
the screenshots go). Exits non-zero, saying which step failed.
"""

import os
import sys
import time

from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

GATEWAY = os.environ["GATEWAY"]
SHOTS = os.environ["SHOTS"]
STEP = ["start"]


def step(name):
    STEP[0] = name
    print(f"step: {name}", flush=True)


def shot(driver, name):
    path = os.path.join(SHOTS, name)
    driver.save_screenshot(path)
    print(f"screenshot: {path}", flush=True)


def wait(driver, condition, timeout=30):
    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)


def css(selector):
    return (By.CSS_SELECTOR, selector)


def text_of(driver, selector):
    try:
        return driver.find_element(*css(selector)).text
    except Exception:
        return ""


def main():
    options = webdriver.ChromeOptions()
    options.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"]:
        options.add_argument(flag)
    service = Service(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        run(driver)
    except TimeoutException:
        shot(driver, "failed.png")
        print(f"FAILED at step '{STEP[0]}': timed out; the page said:\n{driver.find_element(By.TAG_NAME, 'body').text}", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 - report any failure with its step
        shot(driver, "failed.png")
        print(f"FAILED at step '{STEP[0]}': {e!r}", file=sys.stderr)
        sys.exit(1)
    finally:
        logs = driver.get_log("browser") if hasattr(driver, "get_log") else []
        # Script errors fail the test; refused requests the steps provoke
        # (a wrong key, a bad field) are reported by Chromium as network
        # errors and are expected.
        errors = [l for l in logs if l.get("level") == "SEVERE" and l.get("source") != "network"]
        driver.quit()
    if errors:
        print(f"FAILED: the page logged errors: {errors}", file=sys.stderr)
        sys.exit(1)


def run(driver):
    step("a wrong key is refused")
    driver.get(GATEWAY + "/ui/")
    key = wait(driver, ec.presence_of_element_located(css("#api-key")))
    key.send_keys("cap_not-a-real-key")
    driver.find_element(*css("#sign-in")).click()
    wait(driver, lambda d: "valid API key" in text_of(d, "#problem"))
    shot(driver, "01-sign-in.png")

    step("sign in")
    key = driver.find_element(*css("#api-key"))
    key.clear()
    key.send_keys(os.environ["ADMIN_KEY"])
    driver.find_element(*css("#sign-in")).click()
    wait(driver, lambda d: "No apps yet" in text_of(d, "main"))
    cookies = {c["name"]: c for c in driver.get_cookies()}
    session = cookies.get("capstan_session")
    assert session and session["httpOnly"] and session.get("sameSite") == "Strict", f"session cookie: {session}"
    assert driver.execute_script("return document.cookie").find("capstan_session") < 0, "the cookie is readable by scripts"
    shot(driver, "02-empty.png")

    step("a spec with a bad field is refused at the field")
    driver.find_element(*css("#new-app")).click()
    spec = wait(driver, ec.presence_of_element_located(css("#spec")))
    good = open(os.environ["SPEC"]).read()
    spec.send_keys(good.replace('interval = "1s"', 'interval = "5ms"'))
    driver.find_element(*css("#deploy")).click()
    wait(driver, ec.presence_of_element_located(css('#field-errors li[data-field="health.interval"]')))
    shot(driver, "03-field-error.png")

    step("deploy the example app from the UI")
    spec.clear()
    spec.send_keys(good)
    driver.find_element(*css("#deploy")).click()
    wait(driver, lambda d: d.current_url.endswith("#/apps/hello"))
    wait(driver, lambda d: text_of(d, "#app-health") == "3/3", timeout=60)
    shot(driver, "04-app-healthy.png")

    step("scale it")
    replicas = driver.find_element(*css("#replicas"))
    replicas.clear()
    replicas.send_keys("2")
    driver.find_element(*css("#scale")).click()
    wait(driver, lambda d: text_of(d, "#app-health") == "2/2" and len(d.find_elements(*css("tr[data-instance]"))) == 2, timeout=60)

    step("read its logs")
    wait(driver, lambda d: "hello-" in text_of(d, "#logs") and "GET /" in text_of(d, "#logs"), timeout=40)
    shot(driver, "05-app-scaled-logs.png")

    step("the apps list")
    driver.get(GATEWAY + "/ui/#/apps")
    wait(driver, lambda d: d.find_elements(*css('tr[data-app="hello"] [data-health="2/2"]')))
    shot(driver, "06-apps.png")

    step("nodes")
    driver.get(GATEWAY + "/ui/#/nodes")
    wait(driver, lambda d: d.find_elements(*css("tr[data-node]")))
    shot(driver, "07-nodes.png")

    step("revoke a key")
    name = os.environ["REVOKE"]
    driver.get(GATEWAY + "/ui/#/keys")
    wait(driver, lambda d: d.find_elements(*css(f'tr[data-key="{name}"]')))
    driver.find_element(*css(f'button.revoke[data-key="{name}"]')).click()
    wait(driver, ec.alert_is_present()).accept()
    wait(driver, lambda d: not d.find_elements(*css(f'tr[data-key="{name}"]')))
    shot(driver, "08-keys.png")

    step("the audit page shows the changes")
    driver.get(GATEWAY + "/ui/#/audit")
    wait(driver, lambda d: "chain intact" in text_of(d, "#audit-verdict"))
    body = text_of(driver, "main")
    for method in ["Orchestrator/ApplyApp", "Orchestrator/ScaleApp", "Auth/RevokeApiKey"]:
        assert method in body, f"{method} not on the audit page"
    shot(driver, "09-audit.png")

    step("readable on a phone")
    driver.set_window_size(390, 844)
    driver.get(GATEWAY + "/ui/#/apps/hello")
    wait(driver, lambda d: text_of(d, "#app-health") == "2/2")
    width = driver.execute_script("return document.documentElement.scrollWidth")
    assert width <= 400, f"the app page is {width}px wide on a 390px screen"
    shot(driver, "10-phone.png")

    step("sign out")
    driver.set_window_size(1280, 900)
    driver.find_element(*css("#sign-out")).click()
    wait(driver, ec.presence_of_element_located(css("#api-key")))
    print("ok", flush=True)


if __name__ == "__main__":
    main()

"""End to end: `python serve/controller.py` with the tiny trained planner and a real (tiny) Grounding
DINO tool worker; an image through the OpenAI API, the CLI, and the Gradio page in headless Chromium."""

import os
import shutil
import subprocess
import sys

import httpx
import pytest

from _serve_fixtures import ROOT, ServeProcess, data_url, serve_env

QUESTION = "Can you locate the tumor in this MRI image?"


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    from _tools_fixtures import save_tiny_grounding_dino
    from mmedagent.train.fixture import PLANNER_CASES, trained_tiny_planner

    case = next(c for c in PLANNER_CASES if c.question == QUESTION)
    planner = trained_tiny_planner()
    root = tmp_path_factory.mktemp("e2e")
    dino = save_tiny_grounding_dino(root / "grounding-dino")
    (root / "serve.yaml").write_text(
        "heartbeat_interval_s: 1\nheartbeat_expiry_s: 4\nmax_new_tokens: 96\n"
        f"tools:\n  grounding:\n    options: {{model: '{dino}', device: cpu, max_boxes: 3}}\n"
    )
    image = root / "case.png"
    case.image().save(image)
    proc = ServeProcess(
        "controller.py",
        ["--config", str(root / "serve.yaml"), "--port", "0", "--web-port", "0", "--model-path", str(planner),
         "--conv-template", "vicuna_v1", "--system-prompt", "plain", "--model-name", "tiny-trained-planner",
         "--prompt-lookup", "8", "--constrain"],
        root / "stack.log", serve_env(XDG_CACHE_HOME=str(root / "cache")),
    )
    url = proc.wait_for(r"controller: (http://\S+)", 60).group(1)
    web = proc.wait_for(r"web UI: (http://\S+)", 10).group(1)
    proc.wait_for(r"^ready: models: \S+; tools: grounding", 240)
    yield {"url": url, "web": web, "case": case, "image": image, "root": root, "proc": proc}
    assert proc.stop() == 0  # Ctrl-C stops the controller and its children cleanly
    assert "stopped" in proc.output()


def ask_api(e2e):
    body = {"model": "mmedagent", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(e2e["image"].read_bytes())}}, {"type": "text", "text": QUESTION}]}]}
    r = httpx.post(f"{e2e['url']}/v1/chat/completions", json=body, timeout=120, trust_env=False)
    assert r.status_code == 200, r.text
    return r


def test_openai_api_runs_tool_call_tool_result_and_answer(e2e):
    case = e2e["case"]
    r = ask_api(e2e)
    trace = r.json()["mmedagent_trace"]
    plan, final = trace["steps"][0], trace["steps"][-1]
    assert plan["thoughts"] == case.plan.thoughts
    assert [(a["API_name"], a["API_params"]) for a in plan["actions"]] == [(c.API_name, c.API_params) for c in case.calls]
    outcome = plan["outcomes"][0]
    assert outcome["ok"] and outcome["tool"] == "grounding dino" and set(outcome["output"]) == {"boxes", "logits", "phrases"}
    assert trace["history"][3]["content"].startswith("grounding dino output: {'boxes': ")  # the tool result fed back
    assert len(trace["steps"]) == 2 and trace["stopped"] == "answer" and not final["actions"]
    answer = r.json()["choices"][0]["message"]["content"]
    assert answer and answer == final["value"]
    status = httpx.get(f"{e2e['url']}/v1/status", timeout=10, trust_env=False).json()
    assert status["models"][0]["constrain"] is True  # --constrain reached the model worker; the trained plan fits the grammar
    assert status["models"][0]["prompt_lookup"] == 0  # --prompt-lookup 8 reached it too, and is off under --constrain:
    assert "prompt lookup is off: constrained decoding" in e2e["proc"].output()  # the planner said so


def test_cli_prints_the_steps_and_answer(e2e):
    out = subprocess.run(
        [sys.executable, str(ROOT / "serve" / "cli.py"), "--controller", e2e["url"], "--image", str(e2e["image"]), "-q", QUESTION],
        capture_output=True, text=True, timeout=120, env=serve_env(), cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert 'tool call: grounding dino {"prompts": ["tumor"]}' in out.stdout
    assert "tool result: {\"boxes\"" in out.stdout and "\nanswer: " in out.stdout
    # what answers, as the web UI's banner says it, on stderr (the answers stay on stdout)
    assert "Model: " in out.stderr and "Research software, not a medical device" in out.stderr, out.stderr[-2000:]
    assert "**" not in out.stderr and "Model: " not in out.stdout
    assert out.stderr.index("Model: ") < out.stderr.index("image: png")  # the banner first, then the view sent


@pytest.mark.skipif(not shutil.which("chromedriver") or not shutil.which("chromium"), reason="needs Debian chromium + chromium-driver")
def test_browser_upload_ask_and_see_the_tool_step(e2e):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    answer = ask_api(e2e).json()["choices"][0]["message"]["content"]  # greedy: the page must show the same
    shot = e2e["root"] / "web-chat.png"
    try:
        driver.get(e2e["web"])
        wait = WebDriverWait(driver, 90)
        wait.until(lambda d: "tiny-trained-planner" in d.find_element(By.ID, "banner").text)
        assert "Tools:" in driver.find_element(By.ID, "banner").text and "grounding" in driver.find_element(By.ID, "banner").text
        driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(e2e["image"]))
        wait.until(lambda d: "Loaded" in d.find_element(By.ID, "image-note").text)
        driver.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(QUESTION)
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: "Tool result: grounding dino" in d.find_element(By.ID, "chat").text)
        wait.until(lambda d: answer in d.find_element(By.ID, "chat").text.split("Tool result")[-1])
        text = driver.find_element(By.ID, "chat").text
        assert "Tool call: grounding dino" in text and QUESTION in text
        driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    assert shot.stat().st_size > 10_000
    if os.environ.get("MMEDAGENT_SCREENSHOT_DIR"):
        shutil.copy(shot, os.environ["MMEDAGENT_SCREENSHOT_DIR"])

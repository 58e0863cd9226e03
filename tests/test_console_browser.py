"""rlft console in a real browser: headless Chromium (Debian's package) driven by Playwright for
Python, against a console serving the run store of a real tiny-model training run (see
conftest's console_workspace) and a fake OpenAI-compatible server for the chat tab.

Every tab loads and draws, charts have points, a filter narrows the rollouts, a transcript opens,
a chat round trip streams its answer, a running run's charts grow, the token is kept by the page,
and the XSS payloads in the store stay text: no dialog, no injected element, no CSP violation.
Screenshots go to $RLFT_SCREENSHOTS (default /tmp/rlft-console-shots). Skips when Playwright or
Chromium is missing.
"""

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
CHROMIUM = os.environ.get("RLFT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM:
    pytest.skip("no chromium on PATH (apt-get install chromium)", allow_module_level=True)

from rlft.console.app import create_app  # noqa: E402
from test_console_api import CHAT_REPLY, BackgroundServer, fake_names, fake_openai  # noqa: E402

SHOTS = Path(os.environ.get("RLFT_SCREENSHOTS", "/tmp/rlft-console-shots"))
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
WATCH = """
window.__csp = [];
document.addEventListener('securitypolicyviolation', e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));
"""
# Charts on the page now: [title, number of x points, number of series] (the test hook is RL.charts).
CHARTS_JS = ("() => RL.charts.filter(c => document.body.contains(c.u.root))"
             ".map(c => [c.title, c.u.data[0].length, c.u.data.length - 1])")


@pytest.fixture(scope="module")
def ws(console_workspace):  # the short name this module uses
    return console_workspace


@pytest.fixture(scope="module")
def console(ws):
    with (BackgroundServer(fake_openai(fake_names(ws))) as fake,
          BackgroundServer(create_app(ws.runs, serve_url=fake.url, poll_ms=300)) as srv):
        yield srv


@pytest.fixture(scope="module")
def browser(console):  # after the workspace: Playwright's sync API keeps an event loop running in this thread
    try:
        pw = sync_api.sync_playwright().start()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"playwright could not start: {e}")
    try:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
    except Exception as e:  # noqa: BLE001
        pw.stop()
        pytest.skip(f"chromium did not launch: {e}")
    yield b
    b.close()
    pw.stop()


class Watched:
    """A page plus everything that must stay empty: dialogs, page errors, console errors."""

    def __init__(self, browser, base_url):
        self.context = browser.new_context(viewport={"width": 1400, "height": 900}, base_url=base_url)
        self.context.add_init_script(WATCH)
        self.page = self.context.new_page()
        self.dialogs, self.errors = [], []
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))

    def open(self, hash_: str, wait_for: str, state: str = "visible"):
        self.page.goto("/#" + hash_)
        self.page.wait_for_selector(wait_for, timeout=10_000, state=state)
        return self.page

    def shot(self, name: str) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)

    def assert_clean(self) -> None:
        p = self.page
        assert self.dialogs == [], f"a dialog fired: {self.dialogs}"
        assert self.errors == [], f"errors in the page: {self.errors}"
        assert p.evaluate("() => window.__csp") == [], "CSP violations: something tried to inject"
        assert p.evaluate("() => window.__pwned") is None
        injected = p.evaluate("""() => ({
            img: document.querySelectorAll('img').length,
            scripts: [...document.scripts].filter(s => !s.src).length,
            bold: document.querySelectorAll('main b').length,
            js_links: [...document.querySelectorAll('a')]
                .filter(a => /^javascript:/i.test(a.getAttribute('href') || '')).length,
            handlers: [...document.querySelectorAll('*')]
                .filter(e => [...e.attributes].some(a => a.name.startsWith('on'))).length,
        })""")
        assert injected == {"img": 0, "scripts": 0, "bold": 0, "js_links": 0, "handlers": 0}, injected


@pytest.fixture
def w(browser, console):
    watched = Watched(browser, console.url)
    yield watched
    watched.assert_clean()
    watched.context.close()


def test_runs_list_sorts_filters_and_links_to_runs(w, ws):
    page = w.open("/", "#runs-table tbody tr")
    assert page.locator("#runs-table tbody tr").count() == 3
    assert page.inner_text(f"#runs-table tbody tr[data-run='{ws.failed_id}'] .err").startswith("ValidationError: validation failed")
    page.click("#runs-table th[data-key='name']")
    names = page.locator("#runs-table tbody tr td:nth-child(2) a").all_inner_texts()
    assert names == sorted(names)
    w.shot("01-runs")
    page.fill("#runs-filter", "doomed")
    assert page.locator("#runs-table tbody tr").count() == 1
    page.fill("#runs-filter", "")
    page.select_option("#runs-status", "running")
    assert "live-run" in page.locator("#runs-table tbody tr").all_inner_texts()[0]
    page.select_option("#runs-status", "")
    page.click(f"#runs-table tr[data-run='{ws.run_id}'] a")
    page.wait_for_selector("#train-charts .chart")


def test_train_tab_charts_have_points_and_smoothing_changes_them(w, ws):
    page = w.open(f"/run/{ws.run_id}/train", "#train-charts .chart")
    charts = {title: (n, s) for title, n, s in page.evaluate(CHARTS_JS)}
    for title in ("Reward (mean, max)", "pass@k · max@k · solve rate", "Reward components", "Policy loss",
                  "Learning rate", "Time per phase (s)", "Throughput (sampled tokens/s)",
                  "Response length (sampled tokens)"):
        assert charts[title][0] == 3, (title, charts)
    assert charts["Reward components"][1] == 2 and charts["Held-out eval"][0] == 3  # eval at steps 0, 2, 3
    raw = page.evaluate("() => RL.charts.find(c => c.title.startsWith('Reward (')).u.data[1].slice()")
    page.locator("#ema").fill("0.9")
    page.wait_for_function("() => document.querySelector('.smoothing .num').textContent === '0.90'")
    smooth = page.evaluate("() => RL.charts.find(c => c.title.startsWith('Reward (')).u.data[1].slice()")
    assert smooth[0] == pytest.approx(raw[0]) and smooth[2] != pytest.approx(raw[2])
    page.locator("#ema").fill("0")
    w.shot("02-train")


def test_a_running_run_updates_live(w, ws):
    page = w.open(f"/run/{ws.live_id}/train", "#train-charts .chart")
    assert "live" in page.inner_text("#train-live")
    n = page.evaluate("() => RL.charts.find(c => c.title.startsWith('Reward (')).u.data[0].length")
    step = n + 1
    ws.store.log_metrics(ws.live_id, step, {"reward/mean": 0.5, "pass@k": 0.9, "loss/policy": -0.05})
    ws.store.update_run(ws.live_id, step=step)
    page.wait_for_function("n => RL.charts.find(c => c.title.startsWith('Reward (')).u.data[0].length === n", arg=step,
                           timeout=5000)
    assert page.inner_text("#run-header").count(f"{step} / 50") == 1
    w.shot("03-train-live")


def test_eval_tab_compares_base_and_latest_with_deltas(w, ws):
    page = w.open(f"/run/{ws.run_id}/eval", "#eval-compare")
    assert page.locator("#eval-table tbody tr").count() == 4  # steps 0, 2, 3 + the external model
    assert page.locator("#eval-table tr.external").inner_text().count("<script>") == 1  # shown as text
    [(title, points, series)] = page.evaluate(CHARTS_JS)
    assert title == "Eval metrics per checkpoint" and points == 3 and series >= 6
    rows = page.locator("#eval-compare tbody tr")
    metrics = rows.evaluate_all("rs => rs.map(r => r.dataset.metric)")
    assert {"reward/mean", "pass@k", "reward/variety", "reward/short"} <= set(metrics)
    assert page.locator("#eval-compare th").nth(1).inner_text().startswith("A: step 0 (base)")
    page.locator("#eval-table tr.external input[name='eval-b']").check()
    assert page.locator("#eval-compare th").nth(2).inner_text().startswith("B: external")
    assert page.locator("#eval-compare tr[data-metric='reward/mean'] td.delta").inner_text() != "–"
    w.shot("04-eval")


def test_rollouts_filter_search_transcript_heatmap_and_xss_stays_text(w, ws):
    page = w.open(f"/run/{ws.run_id}/rollouts", "#rollout-list tbody tr")
    assert page.inner_text("#rollout-count").startswith("26 rollouts")
    # the heatmap opens on the split whose prompts were sampled at several steps (the held-out
    # prompts, at every eval), with its steps labelled under the columns
    page.wait_for_function("() => document.querySelector('#heat-split').dataset.shown === 'eval'")
    assert page.locator("#heat-axis span").all_inner_texts()[:3] == ["0", "2", "3"]
    page.select_option("#heat-split", "train")
    page.wait_for_function("() => document.querySelector('#heatmap .muted').textContent.startsWith('train')")
    assert int(page.get_attribute("#heatmap canvas", "data-cells")) >= 4
    first = ws.store.reward_heatmap(ws.run_id)  # click the first example's first sampled step
    example = min(first)
    page.click("#heatmap canvas", position={"x": 3 + 28 * [1, 2, 3].index(min(first[example])), "y": 2})
    page.wait_for_function("e => document.querySelector('#f-example').value === String(e)", arg=example)
    page.wait_for_function("() => document.querySelector('#rollout-count').textContent.startsWith('4 rollouts')")
    page.click("#f-reset")
    page.select_option("#f-step", "2")
    page.wait_for_function("() => document.querySelector('#rollout-count').textContent.startsWith('8 rollouts')")
    page.click("#f-reset")
    page.fill("#f-search", "zebracorn")
    page.wait_for_function("() => document.querySelector('#rollout-count').textContent.startsWith('2 rollouts')")
    page.select_option("#f-term", "reward_error")
    page.wait_for_function("() => document.querySelector('#rollout-count').textContent.startsWith('1 rollouts')")
    page.click("#rollout-list tbody tr")
    page.wait_for_selector("#transcript .msg")
    roles = page.locator("#transcript .msg .role").all_inner_texts()
    assert [r.lower() for r in roles] == ["system", "user", "assistant", "tool", "assistant"]
    text = page.inner_text("#transcript")
    for shown in ("<script>alert('xss-script');window.__pwned=1</script>", "<img src=x onerror=",
                  "[click](javascript:alert('xss-md'))", "<a href=\"javascript:alert('xss-a')\">link</a>",
                  "calc<img src=x onerror=alert('xss-toolname')>", "6*7 <script>alert('xss-args')</script>",
                  "ZeroDivisionError: division by zero <img src=x onerror=alert('xss-tb')>", "env log <script>",
                  "Let me check <b>bold</b>"):
        assert shown in text, shown
    assert page.locator("#transcript .error-box").count() == 1
    w.shot("05-rollouts-transcript")
    page.click("#f-reset")  # the reset list first: else the wait below can see the previous filter's 1 row
    page.wait_for_function("() => document.querySelector('#rollout-count').textContent.startsWith('26 ')")
    page.select_option("#f-comp", "short")
    page.fill("#f-cmin", "1")
    page.wait_for_function("() => !document.querySelector('#rollout-count').textContent.startsWith('26 ')")
    shown = page.locator("#rollout-list tbody tr td:nth-child(6)").all_inner_texts()
    assert shown and all("short 1" in s and "short 0" not in s for s in shown)


def test_logs_tab_counts_terminations_and_a_failed_run_shows_why_first(w, ws):
    page = w.open(f"/run/{ws.run_id}/logs", "#log-list .log")
    assert page.locator("#term-train tr[data-reason='reward_error']").count() == 1
    assert page.locator("#rollout-errors li").count() == 1
    assert "tool output was <script>" in page.inner_text("#log-list")
    page.select_option("#log-level", "warning")
    page.wait_for_function("() => !document.querySelector('#log-list .lv-info') && "
                           "document.querySelector('#log-list').innerText.includes('tool output was')")
    assert "tool output was <script>" in page.inner_text("#log-list")
    w.shot("06-logs")
    page.click("#rollout-errors li a")
    page.wait_for_selector("#transcript .error-box")
    page = w.open(f"/run/{ws.failed_id}/train", "#run-failure")
    failure = page.locator("#run-failure")
    assert failure.is_visible() and "validation failed" in failure.inner_text()
    assert "ZeroDivisionError: reward bug on purpose" in page.inner_text("#run-failure pre.tb")
    w.shot("07-failed-run")


def test_config_tab_shows_the_resolved_config_and_source_as_text(w, ws):
    page = w.open(f"/run/{ws.run_id}/config", "#config-table")
    assert page.inner_text("#config-table tr[data-key='steps'] td:nth-child(2)") == "3"
    source = page.inner_text("#env-source")
    assert "def variety(ro):" in source and "<script>alert(" in source and "<img src=x onerror=" in source
    assert page.locator("#checkpoints tr").count() == 2  # step 2 (kept for its held-out eval: keep_best) and 3
    page.fill("#config-filter", "lora")
    assert page.locator("#config-table tr:not([hidden])").count() < 10
    w.shot("08-config")


def test_chat_round_trip_streams_the_answer_as_text(w, ws):
    page = w.open(f"/run/{ws.run_id}/chat", "#chat-model option", state="attached")
    assert page.input_value("#chat-model") == f"ft:base:{ws.run_id}:latest"
    page.wait_for_function("() => document.querySelector('#chat-system').value.startsWith('Answer briefly.')")
    page.fill("#chat-input", "hello <b>there</b>")
    page.click("#chat-send")
    page.wait_for_selector("#chat-log .role-assistant .done")
    answer = page.inner_text("#chat-log .role-assistant .content")
    assert answer == "".join(CHAT_REPLY)
    assert page.inner_text("#chat-log .role-user .content") == "hello <b>there</b>"
    assert f"ft:base:{ws.run_id}:latest · stop" in page.inner_text("#chat-log .role-assistant .done")
    assert "no tools" in page.inner_text("#chat-env")
    w.shot("09-chat")
    # the live run's environment has an `add` tool: the console runs it and the model answers with it
    page = w.open(f"/run/{ws.live_id}/chat", "#chat-model option", state="attached")
    page.fill("#chat-input", "what is 2+3?")
    page.click("#chat-send")
    page.wait_for_function("() => [...document.querySelectorAll('#chat-log .role-assistant .done')].length === 1 "
                           "&& !document.querySelector('#chat-log .streaming')")
    assert page.inner_text("#chat-log .role-tool .content") == "5"
    assert "add" in page.text_content("#chat-log .role-tool .msg-head")
    assert "add" in page.inner_text("#chat-log .toolcall .tc-name")
    assert page.inner_text("#chat-log .toolcall .tc-args") == '{"a": 2, "b": 3}'
    answers = page.locator("#chat-log .role-assistant .content").all_inner_texts()
    assert answers == ["", "The sum is 5"]
    assert "add" in page.inner_text("#chat-env")
    w.shot("09b-chat-tools")


def test_compare_overlays_runs_on_the_same_charts(w, ws):
    page = w.open("/", "#runs-table tbody tr")
    for rid in (ws.run_id, ws.live_id):
        page.check(f"#runs-table tr[data-run='{rid}'] input[type=checkbox]")
    page.click("#compare-selected")
    page.wait_for_selector("#compare-charts .chart")
    charts = {t: (n, s) for t, n, s in page.evaluate(CHARTS_JS)}
    assert charts["reward/mean"][1] == 2 and charts["reward/mean"][0] >= 3
    assert page.inner_text("#config-diff tr[data-key='steps']").split("\t")[1:] == ["3", "50"]
    page.select_option("#compare-add", "optim/lr")
    page.wait_for_function("() => RL.charts.some(c => c.title === 'optim/lr')")
    w.shot("10-compare")


def test_health_strip_links_findings_to_their_chart_window_and_compare_shows_them(browser, tmp_path):
    """A run whose truncated share climbs and one that is healthy, in a store of their own: the
    strip names the finding, its chip opens the chart with the window shaded, the compare page
    lists both runs' findings, and the eval comparison colours less truncation as good."""
    from rlft.store import RunStore

    store = RunStore(tmp_path / "runs")
    sick = store.create_run(name="truncating", config={"batch_size": 4, "steps": 8}, model="tiny", environment="env")
    well = store.create_run(name="healthy", config={"batch_size": 4, "steps": 8}, model="tiny", environment="env")
    for s in range(1, 9):
        common = {"pass@k": 0.5 + 0.05 * s, "batch/zero_variance_groups": 1, "batch/trained_sequences": 8}
        store.log_metrics(sick, s, common | {"reward/mean": 0.3, "response/truncated_ratio": 0.08 * s})
        store.log_metrics(well, s, common | {"reward/mean": 0.3 + 0.02 * s, "response/truncated_ratio": 0.0})
    for rid in (sick, well):
        store.set_status(rid, "completed")
        store.add_eval(rid, model="tiny@0", step=0, k=2, metrics={"reward/mean": 0.3, "response/truncated_ratio": 0.5})
        store.add_eval(rid, model="tiny@8", step=8, k=2, metrics={"reward/mean": 0.4, "response/truncated_ratio": 0.1})
    with BackgroundServer(create_app(tmp_path / "runs", poll_ms=300)) as srv:
        watched = Watched(browser, srv.url)
        try:
            page = watched.open(f"/run/{sick}/train", "#health-strip .finding")
            strip = page.inner_text("#health-strip")
            assert "responses run into the length limit" in strip and "truncated share" in strip
            assert "overlong" in strip  # the advice names the config key
            page.locator("#health-strip").screenshot(path=str(tmp_path / "health-strip.png"))
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.locator("#health-strip").screenshot(path=str(SHOTS / "11-health-strip.png"))
            assert (tmp_path / "health-strip.png").stat().st_size > 1000
            page.click("#health-strip a[data-finding='truncation']")
            page.wait_for_selector("#focused-chart")
            assert "truncated_ratio" in page.url and "%401-8" in page.url
            bands = page.evaluate("() => RL.charts.find(c => c.title === 'Truncated share').bands")
            assert [(b["lo"], b["hi"], b["name"]) for b in bands] == [(1, 8, "truncation")]
            watched.shot("11-health-focused-chart")
            page = watched.open(f"/run/{well}/train", "#health-strip .finding")
            assert "no health findings" in page.inner_text("#health-strip")
            page = watched.open(f"/compare/{sick},{well}", "#compare-summary .findings-cell")
            cells = page.locator("#compare-summary .findings-cell")
            assert cells.count() == 2
            assert "responses run into the length limit" in cells.nth(0).inner_text()
            assert "no findings" in cells.nth(1).inner_text()
            watched.shot("12-compare-findings")
            page = watched.open(f"/run/{sick}/eval", "#eval-compare")
            assert "good" in page.get_attribute("#eval-compare tr[data-metric='response/truncated_ratio'] td.delta", "class")
            assert "good" in page.get_attribute("#eval-compare tr[data-metric='reward/mean'] td.delta", "class")
            watched.assert_clean()
        finally:
            watched.context.close()


def test_token_mode_keeps_the_token_for_every_call(browser, ws):
    with BackgroundServer(create_app(ws.runs, token="browser-token-1", poll_ms=300)) as srv:
        watched = Watched(browser, srv.url)
        try:
            page = watched.page
            assert watched.context.request.get(srv.url + "/").status == 401
            page.goto("/?token=browser-token-1#/run/tiny-run/train")
            page.wait_for_selector("#train-charts .chart", timeout=10_000)
            assert "token" not in page.url
            page.click("#tabs a[data-tab='rollouts']")
            page.wait_for_selector("#rollout-list tbody tr")
            watched.assert_clean()
        finally:
            watched.context.close()


def test_an_sft_run_shows_its_kind_and_loss_curves(browser, console_sft_workspace):
    sft_ws = console_sft_workspace
    with BackgroundServer(create_app(sft_ws.runs, poll_ms=300)) as srv:
        w = Watched(browser, srv.url)
        page = w.open("/", "#runs-table tbody tr")
        assert page.locator("#runs-table tbody tr td:nth-child(3)").all_inner_texts() == ["sft"]
        page = w.open(f"/run/{sft_ws.run_id}/train", "#train-charts .chart")
        charts = {title: (n, s) for title, n, s in page.evaluate(CHARTS_JS)}
        assert charts["SFT loss (train, held-out)"] == (6, 2)  # steps 0-5: eval loss at 0, train loss from 1
        assert "SFT throughput (tokens/s)" in charts and "Learning rate" in charts
        w.shot("09-sft")
        w.assert_clean()
        w.context.close()


def test_a_long_run_draws_downsampled_charts_that_zoom_and_a_binned_paged_heatmap(browser, tmp_path):
    """300 of 1,000 planned steps (test_console_scale's store): the charts get buckets of 5 steps
    with each bucket's min..max band (the grad-norm spikes), a drag zooms in at full resolution
    and a double-click goes back; the heatmap shows columns of 2 steps for 64 examples a page."""
    from test_console_scale import build_scale_store

    big = build_scale_store(tmp_path / "runs")
    with BackgroundServer(create_app(tmp_path / "runs", poll_ms=300)) as srv:
        watched = Watched(browser, srv.url)
        try:
            page = watched.open(f"/run/{big.run_id}/train", "#train-charts .chart")
            grad = "RL.charts.find(c => c.title === 'Grad norm')"
            xs = page.evaluate(f"() => {grad}.u.data[0].slice()")
            assert xs == sorted({s // 5 * 5 or 1 for s in range(1, 301)})  # each bucket at its first logged step
            env = page.evaluate(f"() => {grad}.u.rlEnv[0]")
            assert len(env) == len(xs) and max(hi for _, hi in env) == 50.0  # the spikes stay as the band's top
            box = page.locator("[data-chart='Grad norm'] .u-over").bounding_box()
            y = box["y"] + box["height"] / 2
            page.mouse.move(box["x"] + box["width"] * 0.3, y)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] * 0.5, y, steps=5)
            page.mouse.up()
            page.wait_for_function(f"() => {grad}.zoomed")
            zoomed = page.evaluate(f"() => {grad}.u.data[0].slice()")
            assert len(zoomed) > 20 and zoomed == list(range(zoomed[0], zoomed[0] + len(zoomed)))  # every step
            page.locator("[data-chart='Grad norm'] .u-over").dblclick()
            page.wait_for_function(f"() => !{grad}.zoomed && {grad}.u.data[0].length === {len(xs)}")
            watched.shot("12-long-run-train")
            page = watched.open(f"/run/{big.run_id}/rollouts", "#heatmap canvas")
            head = page.inner_text("#heatmap .muted")
            assert head.startswith("train rollouts: examples 1–64 of 150") and "columns of 2 steps" in head
            assert int(page.get_attribute("#heatmap canvas", "data-cells")) > 64
            page.click("#heat-next")
            page.wait_for_function("() => document.querySelector('#heatmap .muted').textContent.includes('examples 65–128')")
            watched.shot("13-long-run-heatmap")
            watched.assert_clean()
        finally:
            watched.context.close()

"""The chat page, served locally and driven in headless Chromium (Debian's chromium + Playwright)."""
import os
import shutil
import time

import pytest
from conftest import free_port, missing_optional, start_service

pytest.importorskip('gradio')
sync_api = pytest.importorskip('playwright.sync_api')
httpx = pytest.importorskip('httpx')

CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')
ARTIFACTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '.ci-artifacts')

if CHROMIUM is None:
    missing_optional('no chromium on PATH (apt-get install chromium)', 'CHATGLM_REQUIRE_BROWSER')


@pytest.fixture(scope='module')
def web(glm2_dir, tmp_path_factory):
    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED='False', NO_PROXY='127.0.0.1,localhost')
    proc = start_service(['web', '--model', glm2_dir, '--device', 'cpu', '--dtype', 'float32', '--port', str(port)],
                         f'http://127.0.0.1:{port}/', tmp_path_factory.mktemp('web') / 'web.log', env=env)
    yield f'http://127.0.0.1:{port}/'
    proc.terminate()
    proc.wait(timeout=30)


def test_type_a_message_and_see_the_streamed_reply(web, glm2_model):
    # Greedy (temperature 0) so the page must show exactly what the model says.
    expected = glm2_model.chat('你好', do_sample=False, max_new_tokens=16)[0]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
            '--disable-sync', '--no-first-run', '--disable-quic'])
        page = browser.new_page(viewport={'width': 1100, 'height': 900})
        page.goto(web, wait_until='domcontentloaded')
        page.get_by_placeholder('Type a message...').wait_for(timeout=60000)
        box = page.locator('textarea').first   # the placeholder goes once a conversation exists
        page.get_by_text('Additional Inputs').click()
        for label, value in (('max new tokens', '16'), ('temperature (0 = greedy)', '0')):
            field = page.get_by_label(f'number input for {label}')
            for _ in range(40):   # a fill that lands before the page has settled is overwritten: redo it
                field.fill(value)
                field.press('Enter')
                page.wait_for_timeout(250)
                if field.input_value() == value:
                    break
            assert field.input_value() == value, f'{label} stayed {field.input_value()}'
        page.wait_for_timeout(500)
        assert [page.get_by_label(f'number input for {label}').input_value()
                for label in ('max new tokens', 'temperature (0 = greedy)')] == ['16', '0']
        box.fill('你好')
        box.press('Enter')
        # The reply streams into a bot bubble; Retry appears once it is complete.
        page.wait_for_function('(t) => [...document.querySelectorAll(".bot")].some(e => e.innerText.includes(t))',
                               arg=expected[:6], timeout=60000)
        page.get_by_role('button', name='Retry').wait_for(timeout=60000)
        shown = ' '.join(page.locator('.bot').all_inner_texts())
        assert expected[:6] in shown
        os.makedirs(ARTIFACTS, exist_ok=True)
        shot = os.path.join(ARTIFACTS, 'web-chat.png')
        page.screenshot(path=shot, full_page=True)
        assert os.path.getsize(shot) > 10000
        # a second turn sees the history; then Clear empties the conversation
        second = glm2_model.chat('介绍下清华大学', [('你好', expected)], do_sample=False, max_new_tokens=16)[0]
        box.fill('介绍下清华大学')
        box.press('Enter')
        page.wait_for_function('(t) => { const b = document.querySelectorAll(".bot");'
                               ' return b.length >= 2 && b[b.length - 1].innerText.includes(t); }',
                               arg=second[:6], timeout=60000)
        deadline = time.time() + 60
        while page.locator('.bot').count() and time.time() < deadline:
            clear = page.get_by_role('button', name='Clear')
            if clear.count():
                clear.first.click()
            page.wait_for_timeout(500)
        assert page.locator('.bot').count() == 0
        browser.close()

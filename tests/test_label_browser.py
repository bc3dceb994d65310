"""The labelling page in a real browser (Debian's chromium through its chromedriver, headless, driven
by selenium): a person logs in, labels a batch with the keyboard while `python -m pilaf_jax.main`
waits for the answers (oracle.reward='human'), and the loop trains on exactly those answers; and the
server is SIGKILLed mid-labelling and restarted while the page keeps going: no answer lost, no query
shown again after its answer was committed.

CI (CI=true) fails when the browser is missing (`.ci/run` installs it); elsewhere these tests skip
with the reason. PILAF_UPDATE_SCREENSHOTS=1 writes the README's screenshots to docs/images/.
"""
from __future__ import annotations

import json
import sqlite3
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import kill_resume as kr  # noqa: E402
from conftest import stored_query  # noqa: E402
from benchmarks import label_load  # noqa: E402
from pilaf_jax.label_server import app as server_app  # noqa: E402
from pilaf_jax.labelling.queue import LabelQueue, QueueError, tie_coin  # noqa: E402

CHROMIUM = os.environ.get('PILAF_CHROMIUM', '/usr/bin/chromium')
CHROMEDRIVER = os.environ.get('PILAF_CHROMEDRIVER', '/usr/bin/chromedriver')
# Flags for a closed network: without the background-networking ones chromium keeps dialling out.
CHROMIUM_FLAGS = ('--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                  '--disable-background-networking', '--disable-component-update', '--disable-sync',
                  '--disable-dev-shm-usage', '--window-size=1280,860')
SCREENSHOTS = os.path.join(REPO, 'docs', 'images')
KEYS = {'left': 'a', 'right': 'b', 'tie': 't', 'skip': 's'}
CONFIG = os.path.join(REPO, 'configs', 'tiny.py')
STEPS, BATCH = 2, 4
# configs/tiny.py at its cheapest (vanilla pairs, a barely trained reference, 4 evaluation prompts):
# what is tested is where the labels come from and that the loop trains on them; the samplers' own
# tests are elsewhere.
LOOP_OVERRIDES = ['--config.oracle.reward=human', f'--config.online.steps={STEPS}',
                  f'--config.dpo.batch_size={BATCH}', '--config.sampler.name=vanilla', '--config.sft.steps=5',
                  '--config.eval.num_prompts=4', '--config.eval.batch_size=4',
                  '--config.labelling.answers_per_query=2', '--config.labelling.poll_seconds=0.05']


def _browser_missing() -> str:
  """Why the browser cannot run here ('' when it can)."""
  for path in (CHROMIUM, CHROMEDRIVER):
    if not os.access(path, os.X_OK):
      return f'{path} is missing (apt-get install chromium chromium-driver; .ci/run does)'
  try:
    import selenium  # noqa: F401
  except ImportError:
    return "selenium is not installed (pip install -e '.[test]')"
  return ''


@pytest.fixture(scope='module')
def browser_factory(tmp_path_factory):
  """Makes headless chromium sessions (each with a fresh profile); quits them all at the end."""
  missing = _browser_missing()
  if missing:
    if os.environ.get('CI', '').lower() == 'true':
      pytest.fail(f'The browser test must run in CI: {missing}.')
    pytest.skip(f'No browser: {missing}.')
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  drivers = []

  def make():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
      options.add_argument(flag)
    options.add_argument(f'--user-data-dir={tmp_path_factory.mktemp("chromium_profile")}')
    # An explicit driver path: selenium-manager never runs (it would try the network).
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    drivers.append(driver)
    return driver
  yield make
  for driver in drivers:
    driver.quit()


class Loop:
  """`python -m pilaf_jax.main` with oracle.reward='human', started once for the module."""

  def __init__(self, tmp):
    self.workdir = os.path.join(tmp, 'run')
    self.path = os.path.join(self.workdir, 'labels.sqlite')
    self.log_path = os.path.join(tmp, 'loop.log')
    with open(self.log_path, 'w') as log:
      self.proc = subprocess.Popen(kr.main_command(self.workdir, CONFIG, LOOP_OVERRIDES), stdout=log,
                                   stderr=subprocess.STDOUT, cwd=REPO, env=kr.subprocess_env())

  def log(self) -> str:
    with open(self.log_path) as f:
      return f.read()[-4000:]


@pytest.fixture(scope='module')
def loop(browser_factory, tmp_path_factory):
  """Started by the module's first test, so that its startup and compilation (most of this file's
  time) overlap the SIGKILL test, which mostly waits; it waits for people before its first step."""
  run = Loop(str(tmp_path_factory.mktemp('loop')))
  yield run
  if run.proc.poll() is None:
    run.proc.kill()
  run.proc.wait()


class Page:
  """The labeller page as a person uses it: log in, read the pair on screen, press a key."""

  def __init__(self, driver, url: str):
    self.driver, self.url = driver, url

  def login(self, token: str, expect: str = 'label') -> None:
    from selenium.webdriver.common.by import By
    self.driver.get(self.url + '/')
    assert self.driver.find_element(By.ID, 'login-message').text  # The 401 page says why.
    self.driver.find_element(By.ID, 'token').send_keys(token)
    self.driver.find_element(By.ID, 'login').click()
    self.wait(lambda d: d.title.startswith('Label' if expect == 'label' else 'Run owner'), 10)

  def wait(self, condition, timeout: float):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(self.driver, timeout, poll_frequency=0.02).until(condition)

  def shown(self, timeout: float = 60.0, after: int = 0) -> dict:
    """The query on screen once the page has put one there more than `after` times (the count is
    in the returned dict as 'shown'; a retry after an error may show the same query again)."""
    def ready(d):
      state = d.execute_script(
          "const q = document.getElementById('query'); return [document.body.dataset.state || '', "
          "document.body.dataset.shown || '0', q.dataset.queryId, "
          "document.getElementById('prompt').textContent, "
          "document.getElementById('left').textContent, document.getElementById('right').textContent];")
      if state[0] == 'query' and int(state[1]) > after:
        return {'shown': int(state[1]), 'query_id': int(state[2]), 'prompt': state[3], 'left': state[4],
                'right': state[5]}
      return False
    return self.wait(ready, timeout)

  def press(self, choice: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    ActionChains(self.driver).send_keys(KEYS[choice]).perform()

  def status(self) -> str:
    return self.driver.execute_script("return document.getElementById('status').textContent;")


def _save_screenshot(driver, name: str, tmp_path) -> str:
  """Saves a PNG under tmp_path, and into docs/images when PILAF_UPDATE_SCREENSHOTS=1."""
  path = os.path.join(str(tmp_path), name)
  driver.save_screenshot(path)
  if os.environ.get('PILAF_UPDATE_SCREENSHOTS') == '1':
    os.makedirs(SCREENSHOTS, exist_ok=True)
    shutil.copy(path, os.path.join(SCREENSHOTS, name))
  return path


def _storage(query, display_choice: str, left_text: str) -> str:
  """The storage-order choice of a press, from what the page showed (not from the server's key)."""
  if display_choice in ('tie', 'skip'):
    return display_choice
  picked_left = display_choice == 'left'
  left_is_a = left_text == query.response_a_text
  assert left_is_a or left_text == query.response_b_text
  return 'a' if picked_left == left_is_a else 'b'


def test_sigkill_of_the_server_while_a_person_labels_loses_nothing(browser_factory, loop, tmp_path):
  """The server dies (SIGKILL) at random moments right after key presses and comes back on the same
  port; the page carries on by itself. Every answer the page acknowledged is stored, the store holds
  exactly the last press of every query, and no query is shown again once its answer is committed."""
  del loop  # Started now to overlap (see the fixture); used by the next test.
  workdir = str(tmp_path)
  path = os.path.join(workdir, 'labels.sqlite')
  label_load.fill_queue(path, 40, 1, 0)
  queue = LabelQueue.open_existing(path)
  token = queue.add_labeller('alice')
  proc, url = label_load.start_server(workdir)
  port = url.rsplit(':', 1)[1]
  page = Page(browser_factory(), url)
  page.login(token)
  rng = random.Random(0)
  presses, acknowledged, kills = [], set(), 0
  restart = lambda: subprocess.Popen(
      [sys.executable, '-m', 'pilaf_jax.label_server', f'--workdir={workdir}', f'--port={port}'],
      cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=kr.subprocess_env())
  try:
    last = 0
    for i in range(17):
      shown = page.shown(after=last)
      status = page.status()  # About the previous press, now that the page has moved on.
      if status.startswith('Saved your answer to query '):
        acknowledged.add(int(status.rstrip('.').rsplit(' ', 1)[1]))
      # Shown again after its answer was committed would be "asked twice".
      assert all(a['query_id'] != shown['query_id'] for a in queue.answers('alice')), shown
      last = shown['shown']
      if i == 16:
        break  # The 16th press has been handled.
      choice = rng.choice(('left', 'right'))
      presses.append((shown['query_id'], choice, shown['left']))
      if i % 4 == 1:  # Kill the server a random moment (0-40 ms) after this press.
        killer = threading.Timer(rng.uniform(0.0, 0.04), proc.send_signal, (signal.SIGKILL,))
        killer.start()
        page.press(choice)
        killer.join()
        proc.wait()
        kills += 1
        time.sleep(rng.uniform(0.1, 0.5))
        proc = restart()
      else:
        page.press(choice)
  finally:
    proc.kill()
    proc.wait()
  assert kills == 4
  stored = {a['query_id']: a['choice'] for a in queue.answers('alice')}
  assert len(queue.answers('alice')) == len(stored)  # None twice.
  last_press = {qid: _storage(stored_query(queue.path, qid), choice, left) for qid, choice, left in presses}
  committed = {qid: c for qid, c in last_press.items() if qid in stored}
  assert acknowledged <= set(stored), 'an answer the page acknowledged is not stored'
  assert committed == {qid: stored[qid] for qid in committed}
  # A press is lost only when the kill cut off its request before the commit, and then the page
  # showed that same query again, and it was pressed again: so every query pressed is stored.
  assert set(last_press) == set(stored)
  assert len(acknowledged) >= 8


def test_long_words_wrap_and_a_failed_answer_is_retried_until_saved(browser_factory, tmp_path):
  """A 25,000-character word stays inside its column; with the server down, a press is retried (not
  dropped) until the server is back, then saved once, and the error line clears once requests work."""
  workdir = str(tmp_path)
  queue = LabelQueue(os.path.join(workdir, 'labels.sqlite'))
  word = 'w' * 25000
  queue.enqueue('b', 0, 'pilaf', [
      dict(row=0, prompt_id=0, prompt_text='Prompt ' + word, response_a_text=word, response_b_text='short',
           source_a=0, source_b=1),
      dict(row=1, prompt_id=1, prompt_text='Prompt 1', response_a_text='one', response_b_text='two',
           source_a=0, source_b=1)])
  token = queue.add_labeller('alice')
  proc, url = label_load.start_server(workdir)
  restart = lambda: subprocess.Popen(
      [sys.executable, '-m', 'pilaf_jax.label_server', f'--workdir={workdir}', f'--port={url.rsplit(":", 1)[1]}'],
      cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=kr.subprocess_env())
  page = Page(browser_factory(), url)
  try:
    page.login(token)
    shown = page.shown()
    widths = page.driver.execute_script(
        "const w = id => [document.getElementById(id).scrollWidth, document.getElementById(id).clientWidth];"
        "return [document.documentElement.scrollWidth, window.innerWidth, w('left'), w('right'), w('prompt')];")
    assert widths[0] <= widths[1], widths  # No horizontal scrolling of the page.
    assert all(scroll <= client for scroll, client in widths[2:]), widths
    proc.kill()
    proc.wait()
    page.press('left')
    page.wait(lambda d: int(d.execute_script('return document.body.dataset.retries || "0"')) >= 2, 30)
    assert 'retrying your answer to query' in page.status(), page.status()
    proc = restart()
    page.wait(lambda d: page.status() == f'Saved your answer to query {shown["query_id"]}.', 60)
    [stored] = queue.answers('alice')
    assert (stored['query_id'], stored['choice']) == (
        shown['query_id'], _storage(stored_query(queue.path, shown['query_id']), 'left', shown['left']))
    # The next pair, answered; then the server goes while the page waits for work, and comes back.
    second = page.shown(after=shown['shown'])
    page.press('right')
    page.wait(lambda d: page.status() == f'Saved your answer to query {second["query_id"]}.', 30)
    proc.kill()
    proc.wait()
    page.wait(lambda d: 'cannot be reached' in page.status(), 30)
    proc = restart()
    page.wait(lambda d: page.status() == '', 30)  # The error is gone once the server answers again.
    assert len(queue.answers('alice')) == 2
  finally:
    proc.kill()
    proc.wait()
    queue.close()


def _wait_for_queue(loop: Loop, timeout: float = 300.0) -> LabelQueue:
  """The run's queue, once the loop has created it."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if loop.proc.poll() is not None:
      pytest.fail(f'the loop exited with status {loop.proc.returncode}:\n{loop.log()}')
    try:
      return LabelQueue.open_existing(loop.path)
    except QueueError:
      time.sleep(0.1)
  pytest.fail(f'the loop made no queue in {timeout:.0f} s')


def _committed_labels(path: str) -> dict:
  """(batch_key, row) -> a_preferred of every labelled pair the label store committed."""
  db = sqlite3.connect(f'file:{path}?mode=ro', uri=True)
  try:
    return {(k, r): bool(a) for k, r, a in db.execute('SELECT batch_key, row, a_preferred FROM pairs')}
  finally:
    db.close()


def _careful_labeller(url: str, token: str, path: str, stop: threading.Event, answered: dict, errors: list):
  """bob, through the JSON API: picks the response the hidden reward prefers, as fast as he can."""
  client = label_load.Client(url, token)
  db = sqlite3.connect(f'file:{path}?mode=ro', uri=True)
  while not stop.is_set():
    status, data = client.post('/api/next')
    if status != 200 or data['query'] is None:
      if status != 200:
        errors.append(data)
      time.sleep(0.05)
      continue
    q = data['query']
    ra, rb, text_a = db.execute('SELECT oracle_reward_a, oracle_reward_b, response_a_text FROM queue_queries '
                                'WHERE query_id=?', (q['query_id'],)).fetchone()
    choice = 'a' if ra >= rb else 'b'
    side = 'left' if (q['left'] == text_a) == (choice == 'a') else 'right'
    status, data = client.post('/api/answer', {'query_id': q['query_id'], 'choice': side})
    if status == 200:
      answered[q['query_id']] = choice
    else:
      errors.append(data)
  db.close()
  client.close()


def test_a_person_labels_with_the_keyboard_and_the_loop_trains_on_exactly_those_answers(
    browser_factory, loop, tmp_path):
  """`python -m pilaf_jax.main` with oracle.reward='human' and two answers per query waits for
  people. alice labels every query in the browser with the A / B keys; bob answers the same queries
  through the JSON API, as the hidden reward would. The queue then holds exactly alice's presses
  (mapped back from what the page showed her, not from the server's key) and bob's answers, the
  label store's committed batches hold their majority (agreement, else the recorded fair coin), and
  the loop has trained on them."""
  workdir, path = loop.workdir, loop.path
  queue = _wait_for_queue(loop)
  token = queue.add_labeller('alice')
  bob_token = queue.add_labeller('bob')
  server, url = label_load.start_server(workdir, log_path=str(tmp_path / 'server.log'))
  stop, bob, bob_errors = threading.Event(), {}, []
  bob_thread = threading.Thread(target=_careful_labeller, args=(url, bob_token, path, stop, bob, bob_errors))
  bob_thread.start()
  try:
    driver = browser_factory()
    page = Page(driver, url)
    page.login(token)
    rng = random.Random(0)
    presses, last = {}, 0
    while len(presses) < STEPS * BATCH:
      shown = page.shown(after=last, timeout=300)
      assert shown['query_id'] not in presses, 'a query was shown again after it was answered'
      query = stored_query(queue.path, shown['query_id'])
      assert shown['prompt'] == query.prompt_text and {shown['left'], shown['right']} == {
          query.response_a_text, query.response_b_text}
      if len(presses) == BATCH + 1:  # Mid-way through the second batch: the README's screenshot.
        _save_screenshot(driver, 'label_page.png', tmp_path)
      choice = rng.choice(('left', 'right'))
      presses[shown['query_id']] = _storage(query, choice, shown['left'])
      page.press(choice)
      last = shown['shown']
    assert loop.proc.wait(timeout=300) == 0, loop.log()
    # The page, with nothing left, says so; the owner page has the run's figures.
    page.wait(lambda d: d.execute_script('return document.body.dataset.state') == 'idle', 30)
    driver.delete_all_cookies()
    with open(os.path.join(workdir, server_app.OWNER_TOKEN_FILE)) as f:
      page.login(f.read().strip(), expect='owner')
    owner_text = ' '.join(driver.execute_script('return document.body.innerText').split())
    assert f'answered {STEPS * BATCH}' in owner_text and 'alice bob 8' in owner_text, owner_text
    _save_screenshot(driver, 'owner_page.png', tmp_path)
  finally:
    stop.set()
    bob_thread.join(30)
    server.kill()
    server.wait()
  assert not bob_errors, bob_errors

  # Exactly alice's presses and bob's answers, and nothing else, in the queue.
  answers = queue.answers()
  assert sorted((a['labeller'], a['query_id'], a['choice']) for a in answers) == sorted(
      [('alice', q, c) for q, c in presses.items()] + [('bob', q, c) for q, c in bob.items()])
  assert set(bob) == set(presses)
  # The committed batches hold their majority, and the loop trained on them: every step ran, with
  # those labels counted, and was saved.
  expected = {}
  for qid, choice in presses.items():
    q = stored_query(queue.path, qid)
    expected[q.batch_key, q.row] = choice == 'a' if choice == bob[qid] else tie_coin(qid)
  assert sorted({k for k, _ in expected}) == [f'online/{t:06d}' for t in range(STEPS)]
  assert _committed_labels(path) == expected
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  final = [r for r in rows if r.get('step') == STEPS and 'labels_used' in r]
  assert final and final[-1]['labels_used'] == STEPS * BATCH, rows[-1]
  assert str(STEPS) in os.listdir(os.path.join(workdir, 'checkpoints'))

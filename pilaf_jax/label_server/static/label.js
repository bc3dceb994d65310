// The labeller page: fetch the assigned query, show it, post the answer for the key pressed.
// All text goes in with textContent (never innerHTML), so nothing a response says can run here.
'use strict';
(function () {
  const query = document.getElementById('query');
  const idle = document.getElementById('idle');
  const status = document.getElementById('status');
  const allowTies = query.dataset.allowTies === 'true';
  const KEYS = {a: 'left', b: 'right', s: 'skip'};
  if (allowTies) KEYS.t = 'tie';
  let current = null;  // The query id on screen, or null.
  let busy = false;  // One request at a time: a held-down key cannot answer twice.
  let idleTimer = null;

  function setText(id, value) {
    document.getElementById(id).textContent = value === null || value === undefined ? '–' : String(value);
  }

  function showProgress(p) {
    if (!p) return;
    setText('p-answered', p.answered);
    setText('p-pending', p.pending);
    setText('p-step', p.loop_step);
    setText('p-mine', p.mine);
  }

  // Progress figures: after an answer, at most once a second, and every 5 s anyway.
  let lastProgress = 0;
  async function refreshProgress(force) {
    if (!force && Date.now() - lastProgress < 1000) return;
    lastProgress = Date.now();
    try {
      const response = await fetch('/api/progress', {credentials: 'same-origin'});
      if (response.ok) showProgress(await response.json());
    } catch (e) { /* The next answer or tick tries again. */ }
  }
  setInterval(function () { refreshProgress(true); }, 5000);

  async function call(path, body) {
    const response = await fetch(path, {
      method: 'POST', credentials: 'same-origin',
      headers: {'Content-Type': 'application/json'},
      body: JSON.stringify(body || {}),
    });
    let data = {};
    try { data = await response.json(); } catch (e) { data = {error: 'The server sent no JSON.'}; }
    if (response.status === 401) { window.location.reload(); }  // Back to the login form.
    return {status: response.status, data: data};
  }

  let shown = 0;  // How many times a query was put on screen (a retry may show the same one again).

  function show(q) {
    current = q ? q.query_id : null;
    if (q) document.body.dataset.shown = String(++shown);
    query.dataset.queryId = q ? String(q.query_id) : '';
    if (q) {
      setText('prompt', q.prompt);
      setText('left', q.left);
      setText('right', q.right);
    }
    query.hidden = !q;
    idle.hidden = !!q;
    document.body.dataset.state = q ? 'query' : 'idle';
  }

  // The status line: an error (data-kind="error") stays until the next request that succeeds.
  function say(text, kind) {
    status.textContent = text;
    status.dataset.kind = kind || 'info';
  }
  function recovered() {
    if (status.dataset.kind === 'error') say('');
  }
  const sleep = function (ms) { return new Promise(function (resolve) { setTimeout(resolve, ms); }); };
  const retryable = function (code) { return code >= 500 || code === 429 || code === 408; };

  async function loadNext() {
    clearTimeout(idleTimer);
    busy = true;
    try {
      const {status: code, data} = await call('/api/next');
      if (code !== 200) {
        say(data.error || ('Error ' + code), 'error');
        if (retryable(code)) idleTimer = setTimeout(loadNext, 2000);  // E.g. the run has no queue yet.
        return;
      }
      recovered();
      if (data.query && data.offered_again) {
        say('You skipped this pair before and nobody else may answer it, so it is back: please answer it ' +
            '(skip again to leave it to the run owner).');
      }
      show(data.query);
      if (!data.query) idleTimer = setTimeout(loadNext, 2000);
    } catch (e) {
      say('The server cannot be reached; retrying.', 'error');
      idleTimer = setTimeout(loadNext, 1000);
    } finally {
      busy = false;
    }
  }

  // Posts the answer until the server has it: a network failure or a 5xx is retried with the same
  // answer (the first try may have been committed; a replay is then refused as already answered,
  // which tells us it was). Any other refusal is shown and the page moves on.
  async function send(id, choice) {
    for (let attempt = 0, delay = 500; ; attempt++, delay = Math.min(2 * delay, 2000)) {
      try {
        const {status: code, data} = await call('/api/answer', {query_id: id, choice: choice});
        if (code === 200 || (attempt > 0 && code === 409 && data.kind === 'AlreadyAnswered')) {
          say('Saved your answer to query ' + id + '.');
          refreshProgress();
          return;
        }
        if (!retryable(code)) {
          say(data.error || ('Error ' + code), 'error');
          return;
        }
        say((data.error || ('Error ' + code)) + ' Retrying your answer to query ' + id + '.', 'error');
      } catch (e) {
        say('The server cannot be reached; retrying your answer to query ' + id + '.', 'error');
      }
      document.body.dataset.retries = String(Number(document.body.dataset.retries || 0) + 1);
      await sleep(delay);
    }
  }

  async function answer(choice) {
    if (busy || current === null) return;
    busy = true;
    document.body.dataset.state = 'sending';
    try {
      await send(current, choice);
    } finally {
      busy = false;
    }
    await loadNext();
  }

  document.addEventListener('keydown', function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
    const choice = KEYS[event.key.toLowerCase()];
    if (choice) { event.preventDefault(); answer(choice); }
  });
  document.querySelectorAll('button[data-choice]').forEach(function (button) {
    button.addEventListener('click', function () { answer(button.dataset.choice); });
  });
  loadNext();
})();

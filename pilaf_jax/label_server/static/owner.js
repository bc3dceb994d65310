// The owner page is rendered on the server and reloads every 10 s to keep the figures fresh (not
// while a control has the focus). Drop / reassign post JSON and reload.
'use strict';
(function () {
  const status = document.getElementById('owner-status');
  setInterval(function () {
    if (document.activeElement === document.body || document.activeElement === null) window.location.reload();
  }, 10000);

  async function post(path, body) {
    try {
      const response = await fetch(path, {method: 'POST', credentials: 'same-origin',
                                          headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body)});
      let data = {};
      try { data = await response.json(); } catch (e) { data = {error: 'The server sent no JSON.'}; }
      if (response.ok) { window.location.reload(); return; }
      status.textContent = data.error || ('Error ' + response.status);
    } catch (e) {
      status.textContent = 'The server cannot be reached; try again.';
    }
  }

  document.querySelectorAll('#waiting button[data-action]').forEach(function (button) {
    button.addEventListener('click', function () {
      const row = button.closest('tr');
      const id = Number(row.dataset.queryId);
      if (button.dataset.action === 'drop') {
        post('/api/drop', {query_id: id});
      } else {
        post('/api/reassign', {query_id: id, labeller: row.querySelector('select').value});
      }
    });
  });
})();
